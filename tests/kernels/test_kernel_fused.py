"""The fused forward (deltaflex.kernels.fused: kkt + solve + wy in one kernel, state pass + output in
another) against the forward of the stages, compiled and Triton, and the float64 oracle."""

import pytest
import torch

from deltaflex.chunk.function import forward_chunks
from deltaflex.chunk.layout import from_chunks, to_chunks
from deltaflex.chunk.state import Stepping
from deltaflex.kernels import fused
from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import TOLERANCES, make_inputs, relative_error, rounding_excess

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5 if DEVICE == "cpu" else 1e-4  # the GPU's float32 products: 3xTF32 against cuBLAS


def _chunked(x, C):
    low = x["q"].dtype
    return (*(to_chunks(x[n], C, low) for n in "qkv"), to_chunks(x["beta"], C, torch.float32),
            x["initial_state"].float())


@pytest.mark.parametrize("shape,dtype,policy,keys", [
    ((2, 40, 2, 20, 24, 32), torch.float32, "fp32", "random"),
    ((1, 40, 2, 20, 24, 16), torch.bfloat16, "bf16x3", "correlated"),
    ((1, 130, 1, 80, 72, 64), torch.bfloat16, "bf16x3", "random"),  # several key tiles of the state
    ((1, 40, 1, 16, 16, 16), torch.float16, "bf16", "random"),
])
def test_fused_forward_matches_the_stages_and_the_oracle(poisoned, shape, dtype, policy, keys):
    B, T, H, K, V, C = shape
    x = make_inputs(B, T, H, K, V, dtype=dtype, device=DEVICE, keys=keys, initial_state=True)
    chunks = _chunked(x, C)
    options = dict(scale=0.5, use_qk_l2norm=False, policy=policy, stepping=Stepping("loop", 1))
    o, final, t = fused.forward_chunks(*chunks, **options)
    assert o.dtype == dtype and final.dtype == torch.float32
    o_ref, s_ref = recurrent_delta_rule_ref(**x, scale=0.5, output_final_state=True)
    assert relative_error(from_chunks(o, T, dtype), o_ref) <= TOLERANCES[dtype]
    assert relative_error(final, s_ref) <= TOLERANCES[dtype]
    for backend in ("compiled", "triton"):
        o_stages, final_stages, t_stages = forward_chunks(*chunks, None, **options, backends=((backend, None),) * 4)
        assert t.shape == t_stages.shape and relative_error(t, t_stages) <= 1e-4, backend  # what backward reuses
        # the same products: o differs from the stages' float32 o by its own rounding and float32 noise,
        # and under the bf16 policy by a flipped rounding of an intermediate operand (of order eps)
        if dtype == torch.float32:
            assert relative_error(o, o_stages) <= FP32_TOL, backend
        elif policy == "bf16":
            assert rounding_excess(o, o_stages) <= 4 * torch.finfo(dtype).eps, backend
        else:
            assert rounding_excess(o, o_stages) <= 10 * FP32_TOL, backend
        assert relative_error(final, final_stages) <= (FP32_TOL if dtype == torch.float32 else 1e-4), backend


def test_fused_forward_with_l2norm_in_op():
    x = make_inputs(1, 40, 2, 16, 16, dtype=torch.bfloat16, device=DEVICE, initial_state=True)
    x["k"] = 0.5 * x["k"] + 0.1 * torch.randn_like(x["k"])
    chunks = _chunked(x, 16)
    options = dict(scale=0.25, use_qk_l2norm=True, policy="bf16x3", stepping=Stepping("loop", 1))
    o, final, _ = fused.forward_chunks(*chunks, **options)
    o_ref, s_ref = recurrent_delta_rule_ref(**x, scale=0.25, output_final_state=True, use_qk_l2norm=True)
    assert relative_error(from_chunks(o, 40, torch.bfloat16), o_ref) <= TOLERANCES[torch.bfloat16]
    assert relative_error(final, s_ref) <= 1e-4
