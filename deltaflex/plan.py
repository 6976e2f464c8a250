"""Plans: how `delta_rule` computes, as a small frozen record.

A plan names the chunk size, a backend for each stage (`compiled`: blocked PyTorch ops, through
torch.compile unless `compile` is off; `triton`: hand-written kernels) and the compile options.
Plans are hashable, so the autograd.Function can take one as a plain argument.
"""

from __future__ import annotations

import dataclasses

from .chunk.matmul import POLICIES
from .validation import check_chunk_size

STAGES = ("solve", "wy", "state", "output")
BACKENDS = ("compiled", "triton")
PRECISIONS = ("auto", *POLICIES)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class Plan:
    chunk_size: int = 64
    solve: str = "compiled"  # kkt + solve: A and T = (I + A)^-1 per chunk
    wy: str = "compiled"  # W = T beta K, U = T beta V
    state: str = "compiled"  # the sequential pass across chunks
    output: str = "compiled"  # O from Q, K, V_new and the chunk states
    compile: bool = True  # False runs the compiled-backend stages eagerly (debugging, CPU)
    compile_mode: str | None = None  # torch.compile's mode, e.g. "reduce-overhead" for CUDA graphs
    unroll: bool = False  # state pass as an unrolled loop instead of the scan op (one graph per T)
    precision: str = "auto"  # matmul policy (chunk/matmul.py); auto: fp32 on CPU, bf16x3 on GPU

    def __post_init__(self):
        check_chunk_size(self.chunk_size)
        for stage in STAGES:
            backend = getattr(self, stage)
            if backend not in BACKENDS:
                raise ValueError(f"plan stage {stage!r} must use one of {BACKENDS}, got {backend!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"plan precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"plan compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")

    def precision_for(self, device_type: str) -> str:
        if self.precision != "auto":
            return self.precision
        return "fp32" if device_type == "cpu" else "bf16x3"

    def backends(self) -> dict[str, str]:
        return {stage: getattr(self, stage) for stage in STAGES}


NAMED_PLANS = {
    "eager": Plan(compile=False),
    "compiled": Plan(),
    # hand-written Triton kernels (deltaflex.kernels) for every stage; no torch.compile of their glue
    "triton": Plan(solve="triton", wy="triton", state="triton", output="triton", compile=False),
    # compiled intra-chunk stages around the single-launch Triton state pass
    "compiled+triton-state": Plan(state="triton"),
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
