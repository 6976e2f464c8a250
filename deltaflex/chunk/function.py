"""The chunkwise delta rule, forward and backward, as blocked PyTorch ops, and its autograd.Function.

Forward: kkt + solve -> wy -> state pass -> output, batched over every chunk except the state pass.
Backward recomputes the forward's intermediates (chunk states included) from the saved inputs, so
between the two only the inputs are kept; then a reverse state pass carries dS across chunks and
every other gradient is again batched over all chunks.

All chunk math runs in float32 (float64 for float64 inputs); outputs return in the inputs' dtypes.
"""

from __future__ import annotations

import functools

import torch

from ..plan import Plan
from ..reference import L2NORM_EPS, l2norm
from ..validation import state_dtype
from .layout import from_chunks, to_chunks
from .output import output, output_backward
from .solve import kkt, kkt_backward, solve_unit_lower, solve_unit_lower_backward
from .state import affine_scan, chunk_transitions
from .wy import wy, wy_backward


def l2norm_backward(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Gradient of y = l2norm(x): r (dy - y (y . dy)) with r = 1 / ||x||."""
    r = torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)
    y = x * r
    return r * (dy - y * (y * dy).sum(-1, keepdim=True))


def _chunked(q, k, v, beta, chunk_size):
    acc = state_dtype(q.dtype)
    return tuple(to_chunks(x, chunk_size, acc) for x in (q, k, v, beta))


def _initial_state(initial_state, q, v):
    B, _, H, K = q.shape
    acc = state_dtype(q.dtype)
    if initial_state is None:
        return q.new_zeros(B, H, K, v.shape[-1], dtype=acc)
    return initial_state.to(acc)


def _forward_intermediates(k, v, beta, s0, scan_impl):
    """Everything the output needs, from chunked k, v, beta and the initial state."""
    t = solve_unit_lower(kkt(k, beta))
    w, u = wy(t, k, v, beta)
    p, r = chunk_transitions(k, w, u)
    states, final = affine_scan(p, r, s0, impl=scan_impl)
    v_new = u - w @ states
    return t, w, p, states, final, v_new


def chunk_delta_rule_fwd(q, k, v, beta, initial_state, *, scale, chunk_size, use_qk_l2norm, scan_impl):
    """Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] in the state dtype)."""
    qc, kc, vc, bc = _chunked(q, k, v, beta, chunk_size)
    if use_qk_l2norm:
        qc, kc = l2norm(qc), l2norm(kc)
    s0 = _initial_state(initial_state, q, v)
    _, _, _, states, final, v_new = _forward_intermediates(kc, vc, bc, s0, scan_impl)
    o = output(qc * scale, kc, v_new, states)
    return from_chunks(o, q.shape[1], q.dtype), final


def chunk_delta_rule_bwd(q, k, v, beta, initial_state, do, dfinal, *, scale, chunk_size, use_qk_l2norm, scan_impl):
    """Returns (dq, dk, dv, dbeta, d initial_state or None), each in its input's dtype."""
    T = q.shape[1]
    q_raw, k_raw, vc, bc = _chunked(q, k, v, beta, chunk_size)
    qc, kc = (l2norm(q_raw), l2norm(k_raw)) if use_qk_l2norm else (q_raw, k_raw)
    s0 = _initial_state(initial_state, q, v)
    t, w, p, states, _, v_new = _forward_intermediates(kc, vc, bc, s0, scan_impl)

    doc = to_chunks(do, chunk_size, s0.dtype)
    dq, dk, dv_new, ds_local = output_backward(qc * scale, kc, v_new, states, doc)
    # dS_n = G_n + (I - P_n)^T dS_{n+1}, with G_n the part of dS_n that does not go through S_{n+1}
    g = ds_local - w.transpose(-1, -2) @ dv_new
    ds_final = torch.zeros_like(s0) if dfinal is None else dfinal.to(s0.dtype)
    ds_next, ds0 = affine_scan(p, g, ds_final, reverse=True, transpose=True, impl=scan_impl)
    dv_new = dv_new + kc @ ds_next
    dk = dk + v_new @ ds_next.transpose(-1, -2)
    dw = -dv_new @ states.transpose(-1, -2)

    dt, dk_wy, dv, dbeta = wy_backward(t, kc, vc, bc, dw, dv_new)
    dk_kkt, dbeta_kkt = kkt_backward(kc, bc, solve_unit_lower_backward(t, dt))
    dk = dk + dk_wy + dk_kkt
    dbeta = dbeta + dbeta_kkt
    dq = dq * scale
    if use_qk_l2norm:
        dq, dk = l2norm_backward(q_raw, dq), l2norm_backward(k_raw, dk)
    grads = (
        from_chunks(dq, T, q.dtype),
        from_chunks(dk, T, k.dtype),
        from_chunks(dv, T, v.dtype),
        from_chunks(dbeta, T, beta.dtype),
    )
    return (*grads, None if initial_state is None else ds0.to(initial_state.dtype))


@functools.cache
def _compiled(fn, mode: str):
    return torch.compile(fn, fullgraph=True, mode=None if mode == "default" else mode)


def _select(fn, plan: Plan):
    # Inside a caller's torch.compile the plain ops are traced into the caller's graph instead.
    if plan.compile and not torch.compiler.is_compiling():
        return _compiled(fn, plan.compile_mode)
    return fn


def _options(plan: Plan, scale: float, use_qk_l2norm: bool) -> dict:
    triton_stages = [stage for stage, backend in plan.backends().items() if backend == "triton"]
    if triton_stages:
        raise NotImplementedError(f"the triton backend is not implemented yet (stages {triton_stages})")
    # A compiled graph traces the scan op once; eager runs the plain loop, which is faster there.
    scan_impl = "scan" if plan.compile or torch.compiler.is_compiling() else "loop"
    return dict(scale=scale, chunk_size=plan.chunk_size, use_qk_l2norm=use_qk_l2norm, scan_impl=scan_impl)


class ChunkDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, initial_state, scale, use_qk_l2norm, output_final_state, plan):
        options = _options(plan, scale, use_qk_l2norm)
        o, final = _select(chunk_delta_rule_fwd, plan)(q, k, v, beta, initial_state, **options)
        ctx.save_for_backward(q, k, v, beta, initial_state)
        ctx.options, ctx.plan = options, plan
        return o, (final if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, beta, initial_state = ctx.saved_tensors
        bwd = _select(chunk_delta_rule_bwd, ctx.plan)
        dq, dk, dv, dbeta, ds0 = bwd(q, k, v, beta, initial_state, do, dfinal, **ctx.options)
        return dq, dk, dv, dbeta, ds0, None, None, None, None
