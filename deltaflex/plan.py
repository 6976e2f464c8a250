"""Plans: how `delta_rule` computes, as a small frozen record.

A plan names the chunk size, a backend for each stage (`compiled`: blocked PyTorch ops, through
torch.compile unless `compile` is off; `triton`: hand-written kernels) and the compile options.
Plans are hashable, so the autograd.Function can take one as a plain argument.
"""

from __future__ import annotations

import dataclasses

from .validation import check_chunk_size

STAGES = ("solve", "wy", "state", "output")
BACKENDS = ("compiled", "triton")


@dataclasses.dataclass(frozen=True)
class Plan:
    chunk_size: int = 64
    solve: str = "compiled"  # kkt + solve: A and T = (I + A)^-1 per chunk
    wy: str = "compiled"  # W = T beta K, U = T beta V
    state: str = "compiled"  # the sequential pass across chunks
    output: str = "compiled"  # O from Q, K, V_new and the chunk states
    compile: bool = True  # False runs the compiled-backend stages eagerly (debugging, CPU)

    def __post_init__(self):
        check_chunk_size(self.chunk_size)
        for stage in STAGES:
            backend = getattr(self, stage)
            if backend not in BACKENDS:
                raise ValueError(f"plan stage {stage!r} must use one of {BACKENDS}, got {backend!r}")

    def backends(self) -> dict[str, str]:
        return {stage: getattr(self, stage) for stage in STAGES}


NAMED_PLANS = {
    "eager": Plan(compile=False),
    "compiled": Plan(),
}


def resolve_plan(plan, chunk_size: int | None, device_type: str) -> Plan:
    """A Plan from delta_rule's `plan` and `chunk_size` arguments; an explicit chunk_size wins."""
    if plan is None:
        # Compiling pays off on GPUs; on CPUs compile time (tens of seconds) rarely does.
        plan = "compiled" if device_type == "cuda" else "eager"
    if isinstance(plan, str):
        if plan not in NAMED_PLANS:
            raise ValueError(f"plan must be None, a Plan or one of {tuple(NAMED_PLANS)}, got {plan!r}")
        plan = NAMED_PLANS[plan]
    elif not isinstance(plan, Plan):
        raise TypeError(f"plan must be None, a Plan or a plan name, got {type(plan).__name__}")
    if chunk_size is not None and check_chunk_size(chunk_size) != plan.chunk_size:
        plan = dataclasses.replace(plan, chunk_size=chunk_size)
    return plan
