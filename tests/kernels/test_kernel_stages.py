"""Each Triton stage, forward and backward, against the compiled stage on the same inputs.

Inputs are real chunk-layout tensors (zero-padded ragged last chunk, head dims that are not powers
of two); the intermediates a stage takes (T, W, U, V_new, states) come from the compiled stages and
the incoming gradients are random. Every kernel output starts as NaN (`poisoned`), so an element
left unwritten fails the comparison. Without a GPU this runs in Triton's interpreter, so shapes
are tiny.
"""

import functools

import pytest
import torch

from deltaflex.chunk.layout import packed_layout, to_chunks, to_chunks_packed
from deltaflex.chunk.matmul import make_dot
from deltaflex.chunk.stages import implementation
from deltaflex.chunk.state import Stepping
from deltaflex.testing import make_inputs, relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: Triton's interpreter (tests/conftest.py)

# Stage outputs may differ from the compiled stage's by rounding only: the products' order and,
# under bf16x3, the split of each operand (bf16 rounds inexact operands once: 1e-3 covers the
# rounding of the few values that land on the other side of a bf16 tie).
# On a GPU the kernels' float32 products are 3xTF32 (about 22 significant bits), the compiled
# stages' cuBLAS float32.
STAGE_TOL = {"fp32": 1e-5 if DEVICE == "cpu" else 1e-4, "bf16x3": 1e-4, "bf16": 1e-3}

SHAPES = [  # B, H, T, K, V, C
    (1, 2, 40, 20, 24, 32),  # head dims not powers of two, T not a multiple of C
    (2, 1, 16, 16, 16, 16),  # one chunk of the smallest size
    (1, 1, 100, 32, 16, 64),
    (1, 1, 130, 16, 20, 128),  # the largest chunk, a ragged second one
    (1, 1, 20, 80, 72, 16),  # head dims over one 64-wide block: the loops over key/value blocks
]
PRECISIONS = [(torch.float32, "fp32"), (torch.bfloat16, "bf16x3"), (torch.bfloat16, "bf16"), (torch.float16, "bf16x3")]

LOOP = Stepping("loop", 1)


def _stage_inputs(shape, dtype, policy, keys, lengths=None):
    """Every stage's inputs in the chunk layout; "tokens": q, k, v, beta, do in the caller's layout.
    `lengths`: B = 1 holds packed sequences of these lengths (their initial states in s0)."""
    B, H, T, K, V, C = shape
    x = make_inputs(B, T, H, K, V, dtype=dtype, device=DEVICE, keys=keys)
    x["beta"], x["do"] = x["beta"].float(), torch.randn(B, T, H, V, device=DEVICE).to(dtype)
    if lengths is None:
        segments = None
        q, k, v, do = (to_chunks(x[n], C, dtype).flatten(2, 3) for n in ("q", "k", "v", "do"))
        beta = to_chunks(x["beta"], C, torch.float32).flatten(2, 3)
    else:
        assert B == 1 and sum(lengths) == T
        layout = packed_layout(lengths, C, 1, DEVICE)
        segments = layout.segments
        q, k, v, do = (to_chunks_packed(x[n], layout, C, dtype, 1).flatten(2, 3) for n in ("q", "k", "v", "do"))
        beta = to_chunks_packed(x["beta"], layout, C, torch.float32, 1).flatten(2, 3)
    dot = make_dot(policy, dtype)
    solve, wy, state = (implementation(s, "compiled")[0] for s in ("solve", "wy", "state"))
    t = solve(k, beta, dot)
    w, u = wy(t, k, v, beta, dot)
    s0 = torch.randn(B if lengths is None else len(lengths), H, K, V, device=DEVICE)
    v_new, states, _ = state(k, w, u, s0, dot, LOOP, segments)
    grads = {
        "dt": torch.randn_like(t).tril(-1),
        "dw": torch.randn_like(w),
        "du": torch.randn_like(u),
        "do": do,
        "dv_local": torch.randn_like(v_new),
        "ds_final": torch.randn_like(s0),
    }
    tokens = {n: x[n] for n in ("q", "k", "v", "beta", "do")}
    return dict(q=q, k=k, v=v, beta=beta, t=t, w=w, u=u, s0=s0, v_new=v_new, states=states, dot=dot, **grads,
                tokens=tokens, segments=segments)


def _calls(x):
    """(stage, direction, call) for every stage function, given a backend's (forward, backward)."""
    scale = 0.7
    return {
        ("solve", 0): lambda f: f(x["k"], x["beta"], x["dot"]),
        ("solve", 1): lambda f: f(x["k"], x["beta"], x["t"], x["dt"], x["dot"]),
        ("wy", 0): lambda f: f(x["t"], x["k"], x["v"], x["beta"], x["dot"]),
        ("wy", 1): lambda f: f(x["t"], x["k"], x["v"], x["beta"], x["dw"], x["du"], x["dot"]),
        ("state", 0): lambda f: f(x["k"], x["w"], x["u"], x["s0"], x["dot"], LOOP, x.get("segments")),
        ("state", 1): lambda f: f(x["q"], x["k"], x["w"], x["v_new"], x["states"], x["do"], x["dv_local"],
                                  x["ds_final"], scale, x["dot"], LOOP, x.get("segments")),
        ("output", 0): lambda f: f(x["q"], x["k"], x["v_new"], x["states"], scale, x["dot"]),
        ("output", 1): lambda f: f(x["q"], x["k"], x["v_new"], x["states"], x["do"], scale, x["dot"]),
    }


def _compare_every_stage(x, tol, config=None):
    """Every Triton stage against the compiled one; `config`: the Triton stages' launch configuration.
    Every output is compared before the test fails, so a failure names all the stages that differ."""
    mismatches = []
    for (stage, direction), call in _calls(x).items():
        ref = call(implementation(stage, "compiled")[direction])
        out = call(functools.partial(implementation(stage, "triton")[direction], config=config))
        ref, out = (r if isinstance(r, tuple) else (r,) for r in (ref, out))
        assert len(out) == len(ref)
        for i, (o, r) in enumerate(zip(out, ref)):
            name = f"{stage}{'_backward' if direction else ''}[{i}]"
            assert o.shape == r.shape and o.dtype == r.dtype, name
            err = relative_error(o, r)
            if not err <= tol:  # NaN (an element left unwritten) fails too
                mismatches.append(f"{name}: relative error {err:.2e} > {tol:g}")
    assert not mismatches, "; ".join(mismatches)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("precision", [PRECISIONS[0], PRECISIONS[1]], ids=["fp32", "bf16x3"])
def test_stages_at_every_shape(poisoned, shape, precision):
    dtype, policy = precision
    keys = "correlated" if dtype == torch.bfloat16 else "random"
    _compare_every_stage(_stage_inputs(shape, dtype, policy, keys), STAGE_TOL[policy])


@pytest.mark.gpu  # launch configurations mean nothing to the interpreter
@pytest.mark.parametrize("num_warps", [2, 4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_stages_at_every_warp_count(poisoned, shape, num_warps):
    # every warp count the tuner may choose, with the narrowest and widest state tiles: Triton 3.6
    # miscompiles solve_bwd under bf16 policies at key blocks under 64 (solve.py, NARROW_KEYS_FAULT)
    x = _stage_inputs(shape, torch.bfloat16, "bf16x3", "correlated")
    for bv in (16, 64):
        _compare_every_stage(x, STAGE_TOL["bf16x3"], config=((("BV", bv),), num_warps, 0))


@pytest.mark.parametrize("precision", PRECISIONS, ids=["fp32", "bf16x3", "bf16", "fp16"])
@pytest.mark.parametrize("keys", ["random", "correlated"])
def test_stages_at_every_precision(poisoned, precision, keys):
    dtype, policy = precision
    _compare_every_stage(_stage_inputs(SHAPES[0], dtype, policy, keys), STAGE_TOL[policy])


def test_float32_keys_with_bf16_products(poisoned):
    # use_qk_l2norm hands the stages float32 q and k while the policy's low dtype stays bf16:
    # the kernels must split them like any other inexact operand
    x = _stage_inputs(SHAPES[0], torch.bfloat16, "bf16x3", "random")
    x["q"], x["k"] = x["q"].float() * 1.001, x["k"].float() * 1.001
    _compare_every_stage(x, STAGE_TOL["bf16x3"])


def test_solve_is_the_inverse_with_correlated_keys(poisoned):
    # directly: (I + A) T = I, with A built in float64 from the same keys
    x = _stage_inputs((1, 2, 256, 32, 16, 128), torch.float32, "fp32", "correlated")
    t = implementation("solve", "triton")[0](x["k"], x["beta"], x["dot"]).double()
    k = x["k"].double()
    a = torch.tril(x["beta"].double()[..., None] * (k @ k.transpose(-1, -2)), -1)
    eye = torch.eye(128, dtype=torch.float64, device=t.device)
    assert relative_error((eye + a) @ t, eye.expand_as(t)) < STAGE_TOL["fp32"]


LAYOUT_CASES = [  # (shape, packed sequence lengths or None)
    (SHAPES[0], None), (SHAPES[3], None), (SHAPES[4], None),
    ((1, 2, 57, 20, 24, 16), [5, 0, 19, 1, 32]),  # lengths under, over and at the chunk size, and 0
]


@pytest.mark.parametrize("shape,lengths", LAYOUT_CASES,
                         ids=["x".join(map(str, s)) + ("-packed" if lengths else "") for s, lengths in LAYOUT_CASES])
def test_stages_read_the_callers_layout(poisoned, shape, lengths):
    """Given q, k, v, beta, dO as the caller holds them ([B, T, H, D], chunk_size: the rows of a ragged
    last chunk, of every packed sequence, masked, never read: the bounds check of
    tests/interpreter_bounds.py), every Triton stage gives what it gives on the zero-padded chunk
    layout."""
    x = _stage_inputs(shape, torch.bfloat16, "bf16x3", "correlated", lengths)
    tokens = dict(x, **x["tokens"])
    assert tokens["k"].shape[1] % shape[-1] != 0  # a ragged last chunk
    layout = {"chunk_size": shape[-1]}
    if lengths is not None:
        layout["chunk_table"] = x["segments"].rows
    mismatches = []
    for (stage, direction), padded in _calls(x).items():
        ref = padded(implementation(stage, "triton")[direction])
        out = _calls(tokens)[stage, direction](functools.partial(implementation(stage, "triton")[direction], **layout))
        ref, out = (r if isinstance(r, tuple) else (r,) for r in (ref, out))
        for i, (o, r) in enumerate(zip(out, ref, strict=True)):
            err = relative_error(o, r) if o.shape == r.shape else float("inf")
            if not err <= 1e-6:  # the same products, so the same values up to the order of float32 sums
                mismatches.append(f"{stage}{'_backward' if direction else ''}[{i}]: {err:.2e}")
    assert not mismatches, "; ".join(mismatches)

