"""The Triton decode-step kernel (delta_rule_step backend="triton") against the float64 oracle.

On CUDA the kernel runs natively. Without CUDA the checks run in a subprocess under Triton's
interpreter (TRITON_INTERPRET=1 must be set before triton is imported, so not in this process)."""

import os
import re
import subprocess
import sys

import pytest
import torch

from deltaflex import DeltaNet, delta_rule_step
from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import TOLERANCES, make_inputs, relative_error

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
RUNNABLE = torch.cuda.is_available() or INTERPRETED
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(not RUNNABLE, reason="needs CUDA or the Triton interpreter")

CASES = [  # B, T, H, K, V, dtype, keys, use_qk_l2norm
    (1, 1, 2, 16, 16, torch.float32, "random", False),
    (3, 1, 2, 32, 48, torch.bfloat16, "correlated", False),  # V spans two column blocks
    (2, 4, 3, 20, 40, torch.float32, "random", True),  # dims that are not powers of two; T > 1
    (2, 1, 2, 128, 128, torch.float16, "random", True),
]


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-{c[5]}-{c[6]}-l2{c[7]}")
def test_matches_oracle(case):
    B, T, H, K, V, dtype, keys, l2 = case
    x = make_inputs(B, T, H, K, V, dtype=dtype, device=DEVICE, keys=keys, initial_state=True)
    o, s = delta_rule_step(x["q"], x["k"], x["v"], x["beta"], x["initial_state"], scale=0.4, use_qk_l2norm=l2, backend="triton")
    o_ref, s_ref = recurrent_delta_rule_ref(**x, scale=0.4, output_final_state=True, use_qk_l2norm=l2)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert relative_error(o, o_ref) < TOLERANCES[dtype]
    assert relative_error(s, s_ref) < TOLERANCES[torch.float32]


@needs_kernel
def test_no_state_float32_beta_and_noncontiguous_inputs():
    x = make_inputs(2, 3, 2, 16, 8, dtype=torch.bfloat16, device=DEVICE)
    q = x["q"].transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    beta = x["beta"].float()
    o, s = delta_rule_step(q, x["k"], x["v"], beta, backend="triton")
    o_ref, s_ref = recurrent_delta_rule_ref(x["q"], x["k"], x["v"], beta, output_final_state=True)
    assert relative_error(o, o_ref) < 1e-2 and relative_error(s, s_ref) < 1e-4


@needs_kernel
def test_refuses_what_it_cannot_do():
    x = make_inputs(1, 1, 2, 8, dtype=torch.float32, device=DEVICE, initial_state=True)
    with pytest.raises(ValueError, match="has no backward"):
        delta_rule_step(x["q"].requires_grad_(), x["k"], x["v"], x["beta"], x["initial_state"], backend="triton")
    x64 = make_inputs(1, 1, 2, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="takes bf16/fp16/fp32 inputs"):
        delta_rule_step(x64["q"], x64["k"], x64["v"], x64["beta"], backend="triton")


@needs_kernel
def test_layer_decodes_with_the_kernel():
    layer = DeltaNet(32, 2, use_gate=True, step_backend="triton", plan="eager").to(DEVICE)
    x = torch.randn(2, 12, 32, device=DEVICE)
    with torch.no_grad():
        o_whole = layer(x)[0]
        _, cache = layer(x[:, :9], use_cache=True)
        pieces = []
        for t in range(9, 12):
            o_t, cache = layer(x[:, t : t + 1], cache=cache)
            pieces.append(o_t)
    assert relative_error(torch.cat(pieces, dim=1), o_whole[:, 9:]) < 1e-5


@pytest.mark.skipif(RUNNABLE, reason="runs the checks above directly")
def test_under_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) == len(CASES) + 3, run.stdout[-500:]  # every check above ran


def test_refuses_cpu_without_interpreter():
    if INTERPRETED:
        pytest.skip("the interpreter runs CPU tensors")
    x = make_inputs(1, 1, 2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        delta_rule_step(x["q"], x["k"], x["v"], x["beta"], backend="triton")
