"""Fused forward kernels: two launches for the whole chunkwise forward instead of four.

`solve_wy_kernel`, one program per chunk: kkt + solve (solve.solve_chunk) and then the WY factors
W = T diag(beta) K, U = T diag(beta) V from the T it just wrote (T never leaves L2 between them).
`state_output_kernel`, one program per (batch*head, block of BV value columns), walks the chunks in
order with the state in registers (as state.state_fwd_kernel) and writes each chunk's output at
once:
    V_new = U - W S;  O = scale (Q S + tril(Q K^T) V_new);  S <- S + K^T V_new,
so neither V_new nor the per-chunk states are ever written (the unfused forward writes both, the
states being O(T/C d_k d_v) float32).

Layouts: q, k, v and beta are read in the chunk layout or the caller's token layout (common.chunk_rows);
everything written is in the chunk layout.

Grid: (B*H*N,) and (cdiv(V, BV), B*H). Blocks: as solve.py / wy.py and state.py; the output's
C x C scores are accumulated over the state's key tiles.

These do not fit the stage contract (chunk/stages.py: solve and wy are separate stages, and the
state stage must return the per-chunk states for the output stage); `forward_chunks` has the
signature of chunk.function.forward_chunks so that a plan can select it once the contract allows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import l2norm
from .common import (as_f32, block, check_tensors, chunk_rows, define_op, exact, geometry, launch, load_column,
                     load_rows, load_tile, mma, precision, store_tile, to_low)
from .solve import solve_chunk
from .state import _load_states, _state_plus_kt_x, _store_states, pass_config


@triton.jit
def solve_wy_kernel(k_ptr, v_ptr, beta_ptr, t_ptr, w_ptr, u_ptr, N, H, T, table_ptr,
                    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr,
                    LAYOUT: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    k_off, k_stride, n_rows = chunk_rows(chunk, N, H, T, table_ptr, C, K, LAYOUT)
    v_off, v_stride, _ = chunk_rows(chunk, N, H, T, table_ptr, C, V, LAYOUT)
    beta_off, beta_stride, _ = chunk_rows(chunk, N, H, T, table_ptr, C, 1, LAYOUT)
    k_c, v_c, beta_c, t_c = k_ptr + k_off, v_ptr + v_off, beta_ptr + beta_off, t_ptr + chunk * C * C
    solve_chunk(k_c, k_stride, beta_c, beta_stride, n_rows, t_c, K, C, BK, K_EXACT, POLICY, LOW)
    tb = load_tile(t_c, 0, 0, C, C, C, C) * load_column(beta_c, beta_stride, n_rows, C)[None, :]
    for j in range(0, tl.cdiv(K, BK)):
        w = mma(tb, load_rows(k_c, k_stride, n_rows, 0, j, K, C, BK), tl.zeros([C, BK], tl.float32), False, K_EXACT,
                POLICY, LOW)
        store_tile(w_ptr + chunk * C * K, w, 0, j, C, K, C, BK)
    for j in range(0, tl.cdiv(V, BV)):
        u = mma(tb, load_rows(v_c, v_stride, n_rows, 0, j, V, C, BV), tl.zeros([C, BV], tl.float32), False, V_EXACT,
                POLICY, LOW)
        store_tile(u_ptr + chunk * C * V, u, 0, j, C, V, C, BV)


@triton.jit
def _state_products(acc_ws, acc_qs, scores, i: tl.constexpr, q_c, k_c, qk_stride, n_rows, w_c, s, C: tl.constexpr,
                    K: tl.constexpr, BK: tl.constexpr, Q_EXACT: tl.constexpr, K_EXACT: tl.constexpr,
                    POLICY: tl.constexpr, LOW: tl.constexpr):
    """Adds key tile i's share of W S, Q S and Q K^T."""
    q = load_rows(q_c, qk_stride, n_rows, 0, i, K, C, BK)
    acc_ws = mma(load_tile(w_c, 0, i, C, K, C, BK), s, acc_ws, False, False, POLICY, LOW)
    acc_qs = mma(q, s, acc_qs, Q_EXACT, False, POLICY, LOW)
    scores = mma(q, tl.trans(load_rows(k_c, qk_stride, n_rows, 0, i, K, C, BK)), scores, Q_EXACT, K_EXACT, POLICY,
                 LOW)
    return acc_ws, acc_qs, scores


@triton.jit
def state_output_kernel(q_ptr, k_ptr, w_ptr, u_ptr, s0_ptr, o_ptr, final_ptr, scale, N, H, T, table_ptr,
                        K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        Q_EXACT: tl.constexpr, K_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr,
                        LAYOUT: tl.constexpr):
    iv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    scale = as_f32(scale)
    rc = tl.arange(0, C)
    s0, s1, s2, s3 = _load_states(s0_ptr + bh * K * V, iv, K, V, BK, BV)
    for n in range(N):
        chunk = bh * N + n
        qk_off, qk_stride, n_rows = chunk_rows(chunk, N, H, T, table_ptr, C, K, LAYOUT)
        q_c, k_c, w_c = q_ptr + qk_off, k_ptr + qk_off, w_ptr + chunk * C * K
        ws = tl.zeros([C, BV], tl.float32)
        qs = tl.zeros([C, BV], tl.float32)
        scores = tl.zeros([C, C], tl.float32)
        ws, qs, scores = _state_products(ws, qs, scores, 0, q_c, k_c, qk_stride, n_rows, w_c, s0, C, K, BK, Q_EXACT,
                                         K_EXACT, POLICY, LOW)
        if BK < K:
            ws, qs, scores = _state_products(ws, qs, scores, 1, q_c, k_c, qk_stride, n_rows, w_c, s1, C, K, BK,
                                             Q_EXACT, K_EXACT, POLICY, LOW)
        if 2 * BK < K:
            ws, qs, scores = _state_products(ws, qs, scores, 2, q_c, k_c, qk_stride, n_rows, w_c, s2, C, K, BK,
                                             Q_EXACT, K_EXACT, POLICY, LOW)
        if 3 * BK < K:
            ws, qs, scores = _state_products(ws, qs, scores, 3, q_c, k_c, qk_stride, n_rows, w_c, s3, C, K, BK,
                                             Q_EXACT, K_EXACT, POLICY, LOW)
        v_new = load_tile(u_ptr + chunk * C * V, 0, iv, C, V, C, BV) - ws
        scores = tl.where(rc[:, None] >= rc[None, :], scores, 0.0)
        o = scale * mma(scores, v_new, qs, False, False, POLICY, LOW)
        store_tile(o_ptr + chunk * C * V, to_low(o, LOW), 0, iv, C, V, C, BV)
        s0, s1, s2, s3 = _state_plus_kt_x(s0, s1, s2, s3, k_c, qk_stride, n_rows, v_new, C, K, BK, K_EXACT, POLICY,
                                          LOW)
    _store_states(final_ptr + bh * K * V, s0, s1, s2, s3, iv, K, V, BK, BV)


def _alloc(*shape, dtype, like):
    return torch.empty(*shape, dtype=dtype, device=like.device)


def _solve_wy_fake(k, v, beta, policy, low, chunk_size=0):
    B, H, N, C = geometry(k, chunk_size)[:4]
    return (_alloc(B, H, N, C, C, dtype=torch.float32, like=k),
            _alloc(B, H, N, C, k.shape[-1], dtype=torch.float32, like=k),
            _alloc(B, H, N, C, v.shape[-1], dtype=torch.float32, like=k))


@define_op("solve_wy_fwd", _solve_wy_fake)
def solve_wy_fwd(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, policy: str, low: torch.dtype,
                 chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k, v, beta in the chunk layout, or (chunk_size > 0) in the token layout; t, w, u in the chunk layout."""
    g, K, V = geometry(k, chunk_size), k.shape[-1], v.shape[-1]
    t, w, u = _solve_wy_fake(k, v, beta, policy, low, chunk_size)
    POLICY, LOW = precision(policy, low)
    launch(solve_wy_kernel, (g.B * g.H * g.N,), k, v, beta, t, w, u, *g.kernel_args(), K=K, V=V, C=g.C, BK=block(K),
           BV=block(V), K_EXACT=exact(k, low), V_EXACT=exact(v, low), POLICY=POLICY, LOW=LOW, LAYOUT=g.layout,
           num_warps=4 if g.C <= 32 else 8, num_stages=1)
    return t, w, u


def _state_output_fake(q, k, w, u, s0, scale, policy, low, bv=0, num_warps=0, num_stages=0, chunk_size=0):
    return _alloc(*u.shape, dtype=low, like=q), _alloc(*s0.shape, dtype=torch.float32, like=q)


@define_op("state_output_fwd", _state_output_fake)
def state_output_fwd(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, s0: torch.Tensor,
                     scale: float, policy: str, low: torch.dtype, bv: int = 0, num_warps: int = 0,
                     num_stages: int = 0, chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bv, num_warps, num_stages: the pass's launch parameters; 0 takes state.pass_config's. q, k in
    either layout (as solve_wy_fwd's k); w, u and o in the chunk layout."""
    g, K, V = geometry(k, chunk_size), k.shape[-1], u.shape[-1]
    o, final = _state_output_fake(q, k, w, u, s0, scale, policy, low)
    POLICY, LOW = precision(policy, low)
    cfg = pass_config(K, V, g.C, POLICY, "state_output", bv, num_warps, num_stages)
    launch(state_output_kernel, (triton.cdiv(V, cfg["BV"]), g.B * g.H), q, k, w, u, s0, o, final, scale,
           *g.kernel_args(), K=K, V=V, C=g.C, Q_EXACT=exact(q, low), K_EXACT=exact(k, low), POLICY=POLICY, LOW=LOW,
           LAYOUT=g.layout, **cfg)
    return o, final


def forward_chunks(q, k, v, beta, s0, segments=None, *, scale, use_qk_l2norm, policy, stepping=None, backends=None,
                   chunk_size=0):
    """chunk.function.forward_chunks in two fused launches; returns (o chunks in q's dtype, final, t),
    t in the layout beta came in (chunk_size > 0: the inputs are in the token layout, t is
    [B, H, N, C, C]). `stepping` and `backends` are accepted for the same signature and ignored."""
    if segments is not None:
        raise NotImplementedError("the fused forward does not take packed sequences yet")
    low = q.dtype
    check_tensors(q, k, v, beta, s0)
    groups = beta.shape[2:4] if beta.dim() == 5 else None  # grouped chunk layout [B, H, N/g, g, C]
    if groups is not None:
        q, k, v, beta = (x.flatten(2, 3) for x in (q, k, v, beta))
    if use_qk_l2norm:
        q, k = l2norm(q.float()), l2norm(k.float())
    q, k, v, beta, s0 = (x.contiguous() for x in (q, k, v, beta, s0))
    t, w, u = solve_wy_fwd(k, v, beta, policy, low, chunk_size)
    o, final = state_output_fwd(q, k, w, u, s0, float(scale), policy, low, chunk_size=chunk_size)
    return o, final, t if groups is None else t.unflatten(2, groups)
