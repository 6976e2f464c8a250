"""Hand-written Triton kernels for the four stages, forward and backward, registered as the "triton"
backend of `deltaflex.chunk.stages` (and their launch configurations with `deltaflex.plan`, for
plans and the tuner) when this package is imported. Each op is also a torch.library op
(deltaflex::<stage>_fwd / _bwd), so torch.compile traces through plans that use them.

They take bf16/fp16/fp32 inputs on CUDA (float64 raises: use a compiled stage), q, k, v, beta and dO
either in the chunk layout or, given `chunk_size`, where the caller has them ([B, T, H, D]: the rows
of a ragged last chunk masked; packed sequences placed by a `chunk_table`; common.chunk_rows;
chunk.function.token_layout says when); with
TRITON_INTERPRET=1 set before this import they run on the CPU in Triton's interpreter (tests).
A stage's KernelConfig (num_warps, num_stages; BV, the value columns of a state tile, for the state
pass) applies to its forward and backward kernels; a plan without one uses the kernels' own
choices by head dim and chunk size.
"""

from ..chunk.stages import register
from ..plan import KernelConfig, KernelSpace, register_triton_stage
from . import output, solve, state, wy  # noqa: F401

register("solve", "triton", solve.solve_forward, solve.solve_backward)
register("wy", "triton", wy.wy_forward, wy.wy_backward)
register("state", "triton", state.state_forward, state.state_backward)
register("output", "triton", output.output_forward, output.output_backward)

# What the tuner may vary. The defaults are the kernels' choices at C = 64, head dim 128, bf16.
_PER_CHUNK = KernelSpace(num_warps=(2, 4, 8), num_stages=(1, 2, 3), default=KernelConfig(num_warps=4, num_stages=2))
register_triton_stage("solve", _PER_CHUNK)
register_triton_stage("wy", _PER_CHUNK)
register_triton_stage("output", _PER_CHUNK)
register_triton_stage("state", KernelSpace({"BV": (16, 32, 64)}, num_warps=(2, 4, 8), num_stages=(1, 2, 3),
                                           default=KernelConfig({"BV": 16}, num_warps=4, num_stages=2)))
