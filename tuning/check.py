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


def plan_errors(plan: Plan, x: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative errors of the plan's output, final state and every gradient against the oracle's."""
    ours = {n: t.clone().requires_grad_() for n, t in x.items()}
    refs = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    o, s = delta_rule(**ours, output_final_state=True, plan=plan)
    o_ref, s_ref = recurrent_delta_rule_ref(**refs, output_final_state=True)
    do, ds = torch.randn_like(o_ref), torch.randn_like(s_ref)
    ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
    ((o_ref * do).sum() + (s_ref * ds).sum()).backward()
    errors = {"o": relative_error(o, o_ref), "final_state": relative_error(s, s_ref)}
    for n in ours:
        errors[f"d{n}"] = float("inf") if ours[n].grad is None else relative_error(ours[n].grad, refs[n].grad)
    return errors


def check_plan(plan: Plan, *, K: int, V: int, dtype: torch.dtype, device: str | torch.device) -> float:
    """The worst relative error of the plan over fresh random and correlated-key inputs; raises
    PlanRejected if any result is over TOLERANCES[dtype]."""
    tolerance = TOLERANCES[dtype]
    worst: dict[str, float] = {}
    for keys in KEY_KINDS:
        x = make_inputs(CHECK_B, CHECK_T, CHECK_H, K, V, dtype=dtype, device=device, keys=keys, initial_state=True)
        for name, err in plan_errors(plan, x).items():
            worst[name] = max(worst.get(name, 0.0), err)
    if not all(err <= tolerance for err in worst.values()):  # `not <=` also catches NaN
        raise PlanRejected(plan, worst, tolerance)
    return max(worst.values())
