"""The chunkwise delta rule, forward and backward, as blocked PyTorch ops, and its autograd.Function.

Forward: kkt + solve -> wy -> state pass -> output, batched over every chunk except the state pass.
Backward recomputes the forward's intermediates (chunk states included) from the saved inputs, so
between the two only the inputs are kept; then a reverse state pass carries dS across chunks and
every other gradient is again batched over all chunks.

Products accumulate in float32 (float64 for float64 inputs) under the plan's precision policy
(`matmul.py`); outputs and gradients return in their inputs' dtypes.
"""

from __future__ import annotations

import functools

import torch

from ..plan import Plan
from ..reference import L2NORM_EPS, l2norm
from ..validation import state_dtype
from .layout import from_chunks, to_chunks
from .matmul import make_dot
from .output import output, output_backward
from .solve import kkt, kkt_backward, solve_unit_lower, solve_unit_lower_backward
from .state import state_pass, state_pass_backward
from .wy import wy, wy_backward


def l2norm_backward(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Gradient of y = l2norm(x): r (dy - y (y . dy)) with r = 1 / ||x||."""
    r = torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)
    y = x * r
    return r * (dy - y * (y * dy).sum(-1, keepdim=True))


def _low_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of exact operands: bf16/fp16 inputs stay as they are, others are the state dtype."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else state_dtype(dtype)


def _chunked(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    return to_chunks(x, chunk_size, _low_dtype(x.dtype))


def _initial_state(initial_state, q, v):
    B, _, H, K = q.shape
    if initial_state is None:
        return q.new_zeros(B, H, K, v.shape[-1], dtype=state_dtype(q.dtype))
    return initial_state.to(state_dtype(q.dtype))


def _intra_chunk(k, v, beta, dot):
    t = solve_unit_lower(kkt(k, beta, dot))
    w, u = wy(t, k, v, beta, dot)
    return t, w, u


def forward_chunks(q, k, v, beta, s0, *, scale, use_qk_l2norm, policy, scan_impl):
    """The forward on chunk-layout tensors: q, k [B, H, N, C, K], v [B, H, N, C, V] (in their
    low dtype), beta [B, H, N, C] and s0 [B, H, K, V] (state dtype); returns (o chunks, final)."""
    dot = make_dot(policy, q.dtype)
    if use_qk_l2norm:
        q, k = l2norm(q.to(beta.dtype)), l2norm(k.to(beta.dtype))
    _, w, u = _intra_chunk(k, v, beta, dot)
    v_new, states, final = state_pass(k, w, u, s0, dot=dot, impl=scan_impl)
    return output(q, k, v_new, states, scale, dot), final


def backward_chunks(q, k, v, beta, s0, do, ds_final, *, scale, use_qk_l2norm, policy, scan_impl):
    """Gradients of `forward_chunks` given do (chunk layout, low dtype) and the final state's
    gradient; returns (dq, dk, dv, dbeta, ds0) in chunk layout, float32 (float64)."""
    dot = make_dot(policy, q.dtype)
    q_raw, k_raw = q, k
    if use_qk_l2norm:
        q_raw, k_raw = q.to(beta.dtype), k.to(beta.dtype)
        q, k = l2norm(q_raw), l2norm(k_raw)
    t, w, u = _intra_chunk(k, v, beta, dot)
    v_new, states, _ = state_pass(k, w, u, s0, dot=dot, impl=scan_impl)

    dq, dk, dv_local = output_backward(q, k, v_new, states, do, scale, dot)
    dv_new, ds_next, ds0 = state_pass_backward(q, k, w, do, dv_local, ds_final, scale, dot=dot, impl=scan_impl)
    dk = dk + dot(v_new, ds_next.transpose(-1, -2))
    dw = -dot(dv_new, states.transpose(-1, -2))

    dt, dk_wy, dv, dbeta = wy_backward(t, k, v, beta, dw, dv_new, dot)
    dk_kkt, dbeta_kkt = kkt_backward(k, beta, solve_unit_lower_backward(t, dt), dot)
    dk = dk + dk_wy + dk_kkt
    dbeta = dbeta + dbeta_kkt
    if use_qk_l2norm:
        dq, dk = l2norm_backward(q_raw, dq), l2norm_backward(k_raw, dk)
    return dq, dk, dv, dbeta, ds0


def chunk_delta_rule_fwd(q, k, v, beta, initial_state, *, scale, use_qk_l2norm, plan, device_type):
    """Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] in the state dtype)."""
    C = plan.chunk_size
    chunks = (*(_chunked(x, C) for x in (q, k, v)), to_chunks(beta, C, state_dtype(q.dtype)))
    s0 = _initial_state(initial_state, q, v)
    options = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, policy=plan.precision_for(device_type))
    o, final = _run(forward_chunks, plan, (*chunks, s0), options)
    return from_chunks(o, q.shape[1], q.dtype), final


def chunk_delta_rule_bwd(q, k, v, beta, initial_state, do, dfinal, *, scale, use_qk_l2norm, plan, device_type):
    """Returns (dq, dk, dv, dbeta, d initial_state or None), each in its input's dtype."""
    C, T = plan.chunk_size, q.shape[1]
    chunks = (*(_chunked(x, C) for x in (q, k, v)), to_chunks(beta, C, state_dtype(q.dtype)))
    s0 = _initial_state(initial_state, q, v)
    doc = _chunked(do.to(q.dtype), C)
    ds_final = torch.zeros_like(s0) if dfinal is None else dfinal.to(s0.dtype)
    options = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, policy=plan.precision_for(device_type))
    dq, dk, dv, dbeta, ds0 = _run(backward_chunks, plan, (*chunks, s0, doc, ds_final), options)
    grads = tuple(from_chunks(g, T, x.dtype) for g, x in zip((dq, dk, dv, dbeta), (q, k, v, beta)))
    return (*grads, None if initial_state is None else ds0.to(initial_state.dtype))


@functools.cache
def _compiled(fn, mode):
    compiled = torch.compile(fn, fullgraph=True, mode=mode)

    def run(*args, **kwargs):
        # The bf16x3 policy splits x into x.to(bf16) and its rounding error; by default Inductor
        # folds such cast pairs away inside a fused kernel, which would zero the error term.
        with torch._inductor.config.patch(emulate_precision_casts=True):
            return compiled(*args, **kwargs)

    return run


def _run(fn, plan: Plan, tensors: tuple[torch.Tensor, ...], options: dict):
    """fn(*tensors, **options) on chunk-layout tensors, compiled as the plan says.

    Our own compiled graph marks B (dim 0) and N (dim 2 of chunk tensors) dynamic and scans over
    chunks: one graph for every batch size and sequence length. (The chunking happens outside the
    graph so that N is an input size, not an expression of T, which torch's scan lowering cannot
    handle yet.) Inside a caller's torch.compile the ops are traced into the caller's graph: the
    scan where N is static there, else a loop over chunks that specialises on N.
    """
    if plan.compile and not torch.compiler.is_compiling():
        if not plan.unroll:
            for x in tensors:
                torch._dynamo.maybe_mark_dynamic(x, 0)
                if x.dim() >= 4:
                    torch._dynamo.maybe_mark_dynamic(x, 2)
        return _compiled(fn, plan.compile_mode)(*tensors, **options, scan_impl="loop" if plan.unroll else "scan")
    if torch.compiler.is_compiling():
        static_n = isinstance(tensors[0].shape[2], int)
        return fn(*tensors, **options, scan_impl="scan" if static_n and not plan.unroll else "loop")
    return fn(*tensors, **options, scan_impl="loop")


def _check_backends(plan: Plan) -> None:
    triton_stages = [stage for stage, backend in plan.backends().items() if backend == "triton"]
    if triton_stages:
        raise NotImplementedError(f"the triton backend is not implemented yet (stages {triton_stages})")


class ChunkDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, initial_state, scale, use_qk_l2norm, output_final_state, plan):
        _check_backends(plan)
        options = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, plan=plan, device_type=q.device.type)
        o, final = chunk_delta_rule_fwd(q, k, v, beta, initial_state, **options)
        ctx.save_for_backward(q, k, v, beta, initial_state)
        ctx.options = options
        return o, (final if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, beta, initial_state = ctx.saved_tensors
        dq, dk, dv, dbeta, ds0 = chunk_delta_rule_bwd(q, k, v, beta, initial_state, do, dfinal, **ctx.options)
        return dq, dk, dv, dbeta, ds0, None, None, None, None
