"""Stage 2, the WY factors, and their gradients, Triton programs per chunk and per column block.

Forward (`wy_fwd_kernel`): with Tb = T diag(beta) (float32, C x C), a program forms one BK-block
of W = Tb K or one BV-block of U = Tb V.
Backward (`wy_bwd_kernel`): a program forms one block of dK = Tb^T dW or of dV = Tb^T dU, and one
more per chunk accumulates dTb = dW K^T + dU V^T over all blocks, then dT = dTb diag(beta) and
dbeta = column sums of dTb * T.

Layouts: k, v and beta are read in the chunk layout or the caller's token layout (common.chunk_rows);
everything written is in the chunk layout.

Grid: (cdiv(K, BK) + cdiv(V, BV) [+ 1 backward], B*H*N). Blocks: C is one tile; BK, BV <= 64
(powers of two, masked where the head dims are not).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import (block, check_tensors, chunk_rows, define_op, exact, f32, geometry, launch, launch_options,
                     load_column, load_rows, load_tile, mma, policy_of, precision, store_tile, warps_stages)


@triton.jit
def _tb(t_c, beta, C: tl.constexpr):
    """T diag(beta) of a chunk, and T."""
    t = load_tile(t_c, 0, 0, C, C, C, C)
    return t * beta[None, :], t


@triton.jit
def wy_fwd_kernel(t_ptr, k_ptr, v_ptr, beta_ptr, w_ptr, u_ptr, N, H, T, table_ptr,
                  K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr,
                  LAYOUT: tl.constexpr):
    role, chunk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    beta_off, beta_stride, n_rows = chunk_rows(chunk, N, H, T, table_ptr, C, 1, LAYOUT)
    tb = _tb(t_ptr + chunk * C * C, load_column(beta_ptr + beta_off, beta_stride, n_rows, C), C)[0]
    NK: tl.constexpr = (K + BK - 1) // BK
    if role < NK:  # block `role` of W
        k_off, k_stride, _ = chunk_rows(chunk, N, H, T, table_ptr, C, K, LAYOUT)
        k = load_rows(k_ptr + k_off, k_stride, n_rows, 0, role, K, C, BK)
        w = mma(tb, k, tl.zeros([C, BK], tl.float32), False, K_EXACT, POLICY, LOW)
        store_tile(w_ptr + chunk * C * K, w, 0, role, C, K, C, BK)
    else:  # block `role - NK` of U
        v_off, v_stride, _ = chunk_rows(chunk, N, H, T, table_ptr, C, V, LAYOUT)
        v = load_rows(v_ptr + v_off, v_stride, n_rows, 0, role - NK, V, C, BV)
        u = mma(tb, v, tl.zeros([C, BV], tl.float32), False, V_EXACT, POLICY, LOW)
        store_tile(u_ptr + chunk * C * V, u, 0, role - NK, C, V, C, BV)


@triton.jit
def wy_bwd_kernel(t_ptr, k_ptr, v_ptr, beta_ptr, dw_ptr, du_ptr, dt_ptr, dk_ptr, dv_ptr, dbeta_ptr, N, H, T, table_ptr,
                  K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr,
                  LAYOUT: tl.constexpr):
    role, chunk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    dw_c, du_c = dw_ptr + chunk * C * K, du_ptr + chunk * C * V
    beta_off, beta_stride, n_rows = chunk_rows(chunk, N, H, T, table_ptr, C, 1, LAYOUT)
    beta = load_column(beta_ptr + beta_off, beta_stride, n_rows, C)
    tb, t = _tb(t_ptr + chunk * C * C, beta, C)
    NK: tl.constexpr = (K + BK - 1) // BK
    NV: tl.constexpr = (V + BV - 1) // BV
    if role < NK:  # dK = Tb^T dW, block `role`
        dk = mma(tl.trans(tb), load_tile(dw_c, 0, role, C, K, C, BK), tl.zeros([C, BK], tl.float32), False, False,
                 POLICY, LOW)
        store_tile(dk_ptr + chunk * C * K, dk, 0, role, C, K, C, BK)
    elif role < NK + NV:  # dV = Tb^T dU, block `role - NK`
        dv = mma(tl.trans(tb), load_tile(du_c, 0, role - NK, C, V, C, BV), tl.zeros([C, BV], tl.float32), False,
                 False, POLICY, LOW)
        store_tile(dv_ptr + chunk * C * V, dv, 0, role - NK, C, V, C, BV)
    else:  # dTb = dW K^T + dU V^T -> dT, dbeta
        k_off, k_stride, _ = chunk_rows(chunk, N, H, T, table_ptr, C, K, LAYOUT)
        v_off, v_stride, _ = chunk_rows(chunk, N, H, T, table_ptr, C, V, LAYOUT)
        dtb = tl.zeros([C, C], tl.float32)
        for j in range(0, NK):
            k = load_rows(k_ptr + k_off, k_stride, n_rows, 0, j, K, C, BK)
            dtb = mma(load_tile(dw_c, 0, j, C, K, C, BK), tl.trans(k), dtb, False, K_EXACT, POLICY, LOW)
        for j in range(0, NV):
            v = load_rows(v_ptr + v_off, v_stride, n_rows, 0, j, V, C, BV)
            dtb = mma(load_tile(du_c, 0, j, C, V, C, BV), tl.trans(v), dtb, False, V_EXACT, POLICY, LOW)
        store_tile(dt_ptr + chunk * C * C, dtb * beta[None, :], 0, 0, C, C, C, C)
        tl.store(dbeta_ptr + chunk * C + tl.arange(0, C), tl.sum(dtb * t, 0))


def _wy_fwd_fake(t, k, v, beta, policy, low, num_warps=0, num_stages=0, chunk_size=0, chunk_table=None):
    B, H, N, C = geometry(k, chunk_size, chunk_table)[:4]
    return f32(B, H, N, C, k.shape[-1], like=k), f32(B, H, N, C, v.shape[-1], like=k)


@define_op("wy_fwd", _wy_fwd_fake)
def wy_fwd(t: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, policy: str,
           low: torch.dtype, num_warps: int = 0, num_stages: int = 0, chunk_size: int = 0,
           chunk_table: Optional[torch.Tensor] = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v, beta in the chunk layout, or (chunk_size > 0) in the token layout; t, w, u in the chunk layout."""
    g, K, V = geometry(k, chunk_size, chunk_table), k.shape[-1], v.shape[-1]
    w, u = _wy_fwd_fake(t, k, v, beta, policy, low, chunk_size=chunk_size, chunk_table=chunk_table)
    POLICY, LOW = precision(policy, low)
    BK, BV = block(K), block(V)
    launch(wy_fwd_kernel, (triton.cdiv(K, BK) + triton.cdiv(V, BV), g.B * g.H * g.N), t, k, v, beta, w, u,
           *g.kernel_args(), K=K, V=V, C=g.C, BK=BK, BV=BV, K_EXACT=exact(k, low), V_EXACT=exact(v, low),
           POLICY=POLICY, LOW=LOW, LAYOUT=g.layout, **launch_options(num_warps or (4 if g.C <= 64 else 8), num_stages))
    return w, u


def _wy_bwd_fake(t, k, v, beta, dw, du, policy, low, num_warps=0, num_stages=0, chunk_size=0, chunk_table=None):
    B, H, N, C = geometry(k, chunk_size, chunk_table)[:4]
    return (f32(*t.shape, like=k), f32(B, H, N, C, k.shape[-1], like=k), f32(B, H, N, C, v.shape[-1], like=k),
            f32(B, H, N, C, like=k))


@define_op("wy_bwd", _wy_bwd_fake)
def wy_bwd(t: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, dw: torch.Tensor,
           du: torch.Tensor, policy: str, low: torch.dtype, num_warps: int = 0, num_stages: int = 0,
           chunk_size: int = 0, chunk_table: Optional[torch.Tensor] = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g, K, V = geometry(k, chunk_size, chunk_table), k.shape[-1], v.shape[-1]
    dt, dk, dv, dbeta = _wy_bwd_fake(t, k, v, beta, dw, du, policy, low, chunk_size=chunk_size, chunk_table=chunk_table)
    POLICY, LOW = precision(policy, low)
    BK, BV = block(K), block(V)
    launch(wy_bwd_kernel, (triton.cdiv(K, BK) + triton.cdiv(V, BV) + 1, g.B * g.H * g.N), t, k, v, beta, dw, du, dt,
           dk, dv, dbeta, *g.kernel_args(), K=K, V=V, C=g.C, BK=BK, BV=BV, K_EXACT=exact(k, low),
           V_EXACT=exact(v, low), POLICY=POLICY, LOW=LOW, LAYOUT=g.layout,
           **launch_options(num_warps or (4 if g.C <= 64 else 8), num_stages))
    return dt, dk, dv, dbeta


def wy_forward(t, k, v, beta, dot, config=None, chunk_size=0, chunk_table=None):
    """The registered `wy` stage: (w, u), float32. chunk_size > 0: k, v, beta in the token layout."""
    check_tensors(t, k, v, beta)
    policy, low = policy_of(dot)
    return wy_fwd(t.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(), policy, low,
                  *warps_stages(config), chunk_size, chunk_table)


def wy_backward(t, k, v, beta, dw, du, dot, config=None, chunk_size=0, chunk_table=None):
    """The registered `wy_backward` stage: (dt, dk, dv, dbeta), float32, in the chunk layout."""
    check_tensors(t, k, v, beta, dw, du)
    policy, low = policy_of(dot)
    return wy_bwd(t.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(), dw.contiguous(),
                  du.contiguous(), policy, low, *warps_stages(config), chunk_size, chunk_table)
