"""The torch.library ops behind the Triton stages: their fake (meta) implementations agree with the
real outputs, torch.library.opcheck passes, and the backend refuses what it cannot run."""

import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from deltaflex.chunk.matmul import make_dot
from deltaflex.chunk.stages import available_backends
from deltaflex.kernels import output, solve, state, wy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _op_args(dtype=torch.bfloat16, policy="bf16x3"):
    """(op, args) for every op at one tiny ragged shape: K, V not powers of two."""
    B, H, N, C, K, V = 1, 2, 2, 16, 20, 24

    def r(*shape, dt=torch.float32):
        return torch.randn(*shape, device=DEVICE).to(dt)

    q, k, v, do = r(B, H, N, C, K, dt=dtype), r(B, H, N, C, K, dt=dtype), r(B, H, N, C, V, dt=dtype), r(
        B, H, N, C, V, dt=dtype)
    beta, t = torch.rand(B, H, N, C, device=DEVICE), torch.randn(B, H, N, C, C, device=DEVICE).tril(-1)
    w, u, dv, states = r(B, H, N, C, K), r(B, H, N, C, V), r(B, H, N, C, V), r(B, H, N, K, V)
    s0 = r(B, H, K, V)
    p = (policy, dtype)
    e = torch.empty(0, dtype=torch.int32, device=DEVICE)  # no packed sequences
    return [
        (solve.solve_fwd, (k, beta, *p)),
        (solve.solve_bwd, (k, beta, t, t, *p)),
        (wy.wy_fwd, (t, k, v, beta, *p)),
        (wy.wy_bwd, (t, k, v, beta, w, u, *p)),
        (state.state_fwd, (k, w, u, s0, e, e, e, *p)),
        (state.state_bwd, (q, k, w, u, states, do, dv, s0, e, e, e, 0.5, *p)),
        (output.output_fwd, (q, k, u, states, 0.5, *p)),
        (output.output_bwd, (q, k, u, states, do, 0.5, *p)),
    ]


def _flat(x):
    return list(x) if isinstance(x, (tuple, list)) else [x]


@pytest.mark.parametrize("index", range(8), ids=lambda i: _op_args()[i][0]._name)
def test_fake_matches_real(index):
    op, args = _op_args()[index]
    real = _flat(op(*args))
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = _flat(op(*fake_args))
    assert len(fake) == len(real)
    for f, r in zip(fake, real):
        assert (f.shape, f.dtype, f.device) == (r.shape, r.dtype, r.device)
        assert torch.isfinite(r).all()
    # the explicit fake (used by the interpreter's custom_op) says the same as the traced one
    explicit = _flat(op.fake(*args))
    assert [(e.shape, e.dtype) for e in explicit] == [(r.shape, r.dtype) for r in real]


@pytest.mark.parametrize("index", [0, 4, 7], ids=["solve_fwd", "state_fwd", "output_bwd"])
def test_opcheck(index):
    op, args = _op_args(torch.float32, "fp32")[index]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_registered_for_every_stage():
    for stage in ("solve", "wy", "state", "output"):
        assert {"compiled", "triton"} <= set(available_backends(stage))


def test_refuses_float64():
    dot = make_dot("fp32", torch.float64)
    k = torch.randn(1, 1, 1, 16, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        solve.solve_forward(k, torch.rand(1, 1, 1, 16, dtype=torch.float64, device=DEVICE), dot)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of a machine without a GPU")
def test_cpu_tensors_without_the_interpreter_are_a_clear_error():
    code = (
        "import torch; from deltaflex.kernels import solve; from deltaflex.chunk.matmul import make_dot\n"
        "solve.solve_forward(torch.randn(1, 1, 1, 16, 16), torch.rand(1, 1, 1, 16), make_dot('fp32', torch.float32))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "needs CUDA tensors" in out.stderr, out.stderr[-2000:]
