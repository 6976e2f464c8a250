"""A plan's correctness check: forward and backward against the float64 oracle on fresh random inputs.

The tuner accepts no plan that fails it, whatever its speed. The check runs at a small shape (the
oracle is a sequential loop) with the target's head dims, dtype and device: several chunks of every
chunk size with a partial last one, an initial state, and both random and strongly correlated keys
(the case where a careless triangular inverse loses all precision).
"""

from __future__ import annotations

import torch

from deltaflex.api import delta_rule
from deltaflex.plan import Plan
from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import KEY_KINDS, TOLERANCES, make_inputs, relative_error

CHECK_B, CHECK_T, CHECK_H = 2, 300, 2  # T: 2 full chunks of 128 and a partial one


class PlanRejected(Exception):
    """A plan's results are off the oracle by more than the dtype's tolerance."""

    def __init__(self, plan: Plan, errors: dict[str, float], tolerance: float):
        self.plan, self.errors, self.tolerance = plan, errors, tolerance
        bad = {name: f"{err:.2e}" for name, err in errors.items() if not err <= tolerance}
        super().__init__(f"plan {plan.describe()} is off the float64 oracle: {bad} > {tolerance:g}")


class OracleCheck:
    """Fresh random inputs, with random and with correlated keys, and the oracle's results on them:
    drawn once and shared by every plan checked with this object (a tuning run), since the
    sequential oracle costs more than most plans."""

    def __init__(self, *, K: int, V: int, dtype: torch.dtype, device: str | torch.device):
        self.tolerance = TOLERANCES[dtype]
        self.cases = []
        for keys in KEY_KINDS:
            x = make_inputs(CHECK_B, CHECK_T, CHECK_H, K, V, dtype=dtype, device=device, keys=keys, initial_state=True)
            refs = {n: t.detach().double().requires_grad_() for n, t in x.items()}
            o_ref, s_ref = recurrent_delta_rule_ref(**refs, output_final_state=True)
            do, ds = torch.randn_like(o_ref), torch.randn_like(s_ref)
            ((o_ref * do).sum() + (s_ref * ds).sum()).backward()
            expected = {"o": o_ref.detach(), "final_state": s_ref.detach(), **{f"d{n}": t.grad for n, t in refs.items()}}
            self.cases.append((x, do, ds, expected))

    def errors(self, plan: Plan) -> dict[str, float]:
        """The worst relative error over the cases of the plan's output, final state and every gradient."""
        worst: dict[str, float] = {}
        for x, do, ds, expected in self.cases:
            ours = {n: t.clone().requires_grad_() for n, t in x.items()}
            o, s = delta_rule(**ours, output_final_state=True, plan=plan)
            ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
            got = {"o": o, "final_state": s, **{f"d{n}": t.grad for n, t in ours.items()}}
            for name, ref in expected.items():
                err = float("inf") if got[name] is None else relative_error(got[name], ref)
                worst[name] = max(worst.get(name, 0.0), err)
        return worst

    def __call__(self, plan: Plan) -> float:
        """The plan's worst relative error; raises PlanRejected if any is over TOLERANCES[dtype]."""
        errors = self.errors(plan)
        if not all(err <= self.tolerance for err in errors.values()):  # `not <=` also catches NaN
            raise PlanRejected(plan, errors, self.tolerance)
        return max(errors.values())


def check_plan(plan: Plan, *, K: int, V: int, dtype: torch.dtype, device: str | torch.device) -> float:
    """One plan's check on inputs of its own; see OracleCheck."""
    return OracleCheck(K=K, V=V, dtype=dtype, device=device)(plan)
