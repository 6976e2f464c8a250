"""Stage 4, the output, and its gradients, one Triton program per chunk (and block of values).

Forward (`output_fwd_kernel`): O = scale (Q S_n + tril(Q K^T) V_new) for one chunk and BV value
columns; the C x C scores are accumulated over BK-blocks of the key dim.
Backward (`output_bwd_kernel`): a program per chunk and per key block forms, with the C x C tile
tril(dO V_new^T),
    dQ = scale (dO S_n^T + tril(dO V_new^T) K),  dK = scale tril(dO V_new^T)^T Q;
a program per chunk and per value block forms dV_local = scale tril(Q K^T)^T dO.

Layouts: q, k and dO are read in the chunk layout or the caller's token layout (common.chunk_rows);
everything written is in the chunk layout.

Grid: (cdiv(V, BV), B*H*N) forward, (cdiv(K, BK) + cdiv(V, BV), B*H*N) backward. Blocks: C (the
chunk) is one tile; BK, BV <= 64 (powers of two, masked where the head dims are not).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import (as_f32, block, check_tensors, chunk_rows, define_op, exact, f32, geometry, launch, launch_options,
                     load_rows, load_tile, mma, policy_of, precision, store_tile, warps_stages)


@triton.jit
def _scores(q_c, k_c, stride, n_rows, C: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, Q_EXACT: tl.constexpr,
            K_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr):
    """tril(Q K^T) of a chunk (q and k rows `stride` apart), [C, C] float32."""
    scores = tl.zeros([C, C], tl.float32)
    for j in range(0, tl.cdiv(K, BK)):
        scores = mma(load_rows(q_c, stride, n_rows, 0, j, K, C, BK),
                     tl.trans(load_rows(k_c, stride, n_rows, 0, j, K, C, BK)), scores, Q_EXACT, K_EXACT, POLICY, LOW)
    rc = tl.arange(0, C)
    return tl.where(rc[:, None] >= rc[None, :], scores, 0.0)


@triton.jit
def output_fwd_kernel(q_ptr, k_ptr, v_new_ptr, states_ptr, o_ptr, scale, N, H, T, table_ptr,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      Q_EXACT: tl.constexpr, K_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr,
                      LAYOUT: tl.constexpr):
    iv, chunk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    scale = as_f32(scale)
    qk_off, qk_stride, n_rows = chunk_rows(chunk, N, H, T, table_ptr, C, K, LAYOUT)
    q_c, k_c, states_c = q_ptr + qk_off, k_ptr + qk_off, states_ptr + chunk * K * V
    o = tl.zeros([C, BV], tl.float32)
    for j in range(0, tl.cdiv(K, BK)):
        o = mma(load_rows(q_c, qk_stride, n_rows, 0, j, K, C, BK), load_tile(states_c, j, iv, K, V, BK, BV), o,
                Q_EXACT, False, POLICY, LOW)
    scores = _scores(q_c, k_c, qk_stride, n_rows, C, K, BK, Q_EXACT, K_EXACT, POLICY, LOW)
    o = mma(scores, load_tile(v_new_ptr + chunk * C * V, 0, iv, C, V, C, BV), o, False, False, POLICY, LOW)
    store_tile(o_ptr + chunk * C * V, scale * o, 0, iv, C, V, C, BV)


@triton.jit
def output_bwd_kernel(q_ptr, k_ptr, v_new_ptr, states_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, scale, N, H, T, table_ptr,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      Q_EXACT: tl.constexpr, K_EXACT: tl.constexpr, DO_EXACT: tl.constexpr,
                      POLICY: tl.constexpr, LOW: tl.constexpr, LAYOUT: tl.constexpr):
    role, chunk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    scale = as_f32(scale)
    qk_off, qk_stride, n_rows = chunk_rows(chunk, N, H, T, table_ptr, C, K, LAYOUT)
    do_off, do_stride, _ = chunk_rows(chunk, N, H, T, table_ptr, C, V, LAYOUT)
    q_c, k_c, states_c = q_ptr + qk_off, k_ptr + qk_off, states_ptr + chunk * K * V
    do_c, v_new_c = do_ptr + do_off, v_new_ptr + chunk * C * V
    NK: tl.constexpr = (K + BK - 1) // BK
    if role < NK:  # dq and dk of key block `role`
        rc = tl.arange(0, C)
        dov = tl.zeros([C, C], tl.float32)
        dq = tl.zeros([C, BK], tl.float32)
        for j in range(0, tl.cdiv(V, BV)):
            do = load_rows(do_c, do_stride, n_rows, 0, j, V, C, BV)
            dov = mma(do, tl.trans(load_tile(v_new_c, 0, j, C, V, C, BV)), dov, DO_EXACT, False, POLICY, LOW)
            dq = mma(do, tl.trans(load_tile(states_c, role, j, K, V, BK, BV)), dq, DO_EXACT, False, POLICY, LOW)
        dov = tl.where(rc[:, None] >= rc[None, :], dov, 0.0)
        dq = mma(dov, load_rows(k_c, qk_stride, n_rows, 0, role, K, C, BK), dq, False, K_EXACT, POLICY, LOW)
        store_tile(dq_ptr + chunk * C * K, scale * dq, 0, role, C, K, C, BK)
        dk = mma(tl.trans(dov), load_rows(q_c, qk_stride, n_rows, 0, role, K, C, BK), tl.zeros([C, BK], tl.float32),
                 False, Q_EXACT, POLICY, LOW)
        store_tile(dk_ptr + chunk * C * K, scale * dk, 0, role, C, K, C, BK)
    else:  # dv_local of value block `role - NK`
        scores = _scores(q_c, k_c, qk_stride, n_rows, C, K, BK, Q_EXACT, K_EXACT, POLICY, LOW)
        dv = mma(tl.trans(scores), load_rows(do_c, do_stride, n_rows, 0, role - NK, V, C, BV),
                 tl.zeros([C, BV], tl.float32), False, DO_EXACT, POLICY, LOW)
        store_tile(dv_ptr + chunk * C * V, scale * dv, 0, role - NK, C, V, C, BV)


def _output_fwd_fake(q, k, v_new, states, scale, policy, low, num_warps=0, num_stages=0, chunk_size=0,
                     chunk_table=None):
    return f32(*v_new.shape, like=q)


@define_op("output_fwd", _output_fwd_fake)
def output_fwd(q: torch.Tensor, k: torch.Tensor, v_new: torch.Tensor, states: torch.Tensor, scale: float,
               policy: str, low: torch.dtype, num_warps: int = 0, num_stages: int = 0, chunk_size: int = 0,
               chunk_table: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    """q, k in the chunk layout, or (chunk_size > 0) in the token layout; v_new, states, o in the chunk layout."""
    g, K, V = geometry(q, chunk_size, chunk_table), q.shape[-1], v_new.shape[-1]
    o = _output_fwd_fake(q, k, v_new, states, scale, policy, low)
    POLICY, LOW = precision(policy, low)
    BV = block(V)
    launch(output_fwd_kernel, (triton.cdiv(V, BV), g.B * g.H * g.N), q, k, v_new, states, o, scale, *g.kernel_args(),
           K=K, V=V, C=g.C, BK=block(K), BV=BV, Q_EXACT=exact(q, low), K_EXACT=exact(k, low), POLICY=POLICY, LOW=LOW,
           LAYOUT=g.layout, **launch_options(num_warps or (4 if g.C <= 64 else 8), num_stages))
    return o


def _output_bwd_fake(q, k, v_new, states, do, scale, policy, low, num_warps=0, num_stages=0, chunk_size=0,
                     chunk_table=None):
    B, H, N, C = geometry(q, chunk_size, chunk_table)[:4]
    return f32(B, H, N, C, q.shape[-1], like=q), f32(B, H, N, C, k.shape[-1], like=q), f32(*v_new.shape, like=q)


@define_op("output_bwd", _output_bwd_fake)
def output_bwd(q: torch.Tensor, k: torch.Tensor, v_new: torch.Tensor, states: torch.Tensor, do: torch.Tensor,
               scale: float, policy: str, low: torch.dtype, num_warps: int = 0, num_stages: int = 0,
               chunk_size: int = 0, chunk_table: Optional[torch.Tensor] = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, do in either layout (as output_fwd); the gradients in the chunk layout."""
    g, K, V = geometry(q, chunk_size, chunk_table), q.shape[-1], v_new.shape[-1]
    dq, dk, dv = _output_bwd_fake(q, k, v_new, states, do, scale, policy, low, chunk_size=chunk_size,
                                  chunk_table=chunk_table)
    POLICY, LOW = precision(policy, low)
    BK, BV = block(K), block(V)
    grid = (triton.cdiv(K, BK) + triton.cdiv(V, BV), g.B * g.H * g.N)
    launch(output_bwd_kernel, grid, q, k, v_new, states, do, dq, dk, dv, scale, *g.kernel_args(), K=K, V=V, C=g.C,
           BK=BK, BV=BV, Q_EXACT=exact(q, low), K_EXACT=exact(k, low), DO_EXACT=exact(do, low), POLICY=POLICY,
           LOW=LOW, LAYOUT=g.layout, **launch_options(num_warps or (4 if g.C <= 64 else 8), num_stages))
    return dq, dk, dv


def output_forward(q, k, v_new, states, scale, dot, config=None, chunk_size=0, chunk_table=None):
    """The registered `output` stage: o [B, H, N, C, V], float32. chunk_size > 0: q, k in the token layout."""
    check_tensors(q, k, v_new, states)
    policy, low = policy_of(dot)
    return output_fwd(q.contiguous(), k.contiguous(), v_new.contiguous(), states.contiguous(), float(scale), policy,
                      low, *warps_stages(config), chunk_size, chunk_table)


def output_backward(q, k, v_new, states, do, scale, dot, config=None, chunk_size=0, chunk_table=None):
    """The registered `output_backward` stage: (dq, dk, dv_local), float32, in the chunk layout."""
    check_tensors(q, k, v_new, states, do)
    policy, low = policy_of(dot)
    args = (q, k, v_new, states, do)
    return output_bwd(*(x.contiguous() for x in args), float(scale), policy, low, *warps_stages(config), chunk_size,
                      chunk_table)
