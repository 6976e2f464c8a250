"""Hand-written Triton kernels for the four stages, forward and backward, registered as the "triton"
backend of `deltaflex.chunk.stages` when this package is imported. Each op is also a torch.library
op (deltaflex::<stage>_fwd / _bwd), so torch.compile traces through plans that use them.

They take bf16/fp16/fp32 chunk-layout inputs on CUDA (float64 raises: use a compiled stage); with
TRITON_INTERPRET=1 set before this import they run on the CPU in Triton's interpreter (tests).
"""

from ..chunk.stages import register
from . import fused, output, solve, state, wy  # noqa: F401  (fused: not a stage yet)

register("solve", "triton", solve.solve_forward, solve.solve_backward)
register("wy", "triton", wy.wy_forward, wy.wy_backward)
register("state", "triton", state.state_forward, state.state_backward)
register("output", "triton", output.output_forward, output.output_backward)
