"""Stage 2, the WY factors, and their gradients, Triton programs per chunk and per column block.

Forward (`wy_fwd_kernel`): with Tb = T diag(beta) (float32, C x C), a program forms one BK-block
of W = Tb K or one BV-block of U = Tb V.
Backward (`wy_bwd_kernel`): a program forms one block of dK = Tb^T dW or of dV = Tb^T dU, and one
more per chunk accumulates dTb = dW K^T + dU V^T over all blocks, then dT = dTb diag(beta) and
dbeta = column sums of dTb * T.

Grid: (cdiv(K, BK) + cdiv(V, BV) [+ 1 backward], B*H*N). Blocks: C is one tile; BK, BV <= 64
(powers of two, masked where the head dims are not).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (block, check_tensors, define_op, exact, f32, launch, launch_options, load_tile, mma, policy_of,
                     precision, store_tile, warps_stages)


@triton.jit
def _tb(t_c, beta_c, C: tl.constexpr):
    """T diag(beta) of a chunk, and T."""
    t = load_tile(t_c, 0, 0, C, C, C, C)
    return t * tl.load(beta_c + tl.arange(0, C))[None, :], t


@triton.jit
def wy_fwd_kernel(t_ptr, k_ptr, v_ptr, beta_ptr, w_ptr, u_ptr,
                  K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr):
    role, chunk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    tb, _ = _tb(t_ptr + chunk * C * C, beta_ptr + chunk * C, C)
    NK: tl.constexpr = (K + BK - 1) // BK
    if role < NK:  # block `role` of W
        k = load_tile(k_ptr + chunk * C * K, 0, role, C, K, C, BK)
        w = mma(tb, k, tl.zeros([C, BK], tl.float32), False, K_EXACT, POLICY, LOW)
        store_tile(w_ptr + chunk * C * K, w, 0, role, C, K, C, BK)
    else:  # block `role - NK` of U
        v = load_tile(v_ptr + chunk * C * V, 0, role - NK, C, V, C, BV)
        u = mma(tb, v, tl.zeros([C, BV], tl.float32), False, V_EXACT, POLICY, LOW)
        store_tile(u_ptr + chunk * C * V, u, 0, role - NK, C, V, C, BV)


@triton.jit
def wy_bwd_kernel(t_ptr, k_ptr, v_ptr, beta_ptr, dw_ptr, du_ptr, dt_ptr, dk_ptr, dv_ptr, dbeta_ptr,
                  K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr):
    role, chunk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    k_c, v_c, dw_c, du_c = k_ptr + chunk * C * K, v_ptr + chunk * C * V, dw_ptr + chunk * C * K, du_ptr + chunk * C * V
    tb, t = _tb(t_ptr + chunk * C * C, beta_ptr + chunk * C, C)
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
        dtb = tl.zeros([C, C], tl.float32)
        for j in range(0, NK):
            dtb = mma(load_tile(dw_c, 0, j, C, K, C, BK), tl.trans(load_tile(k_c, 0, j, C, K, C, BK)), dtb, False,
                      K_EXACT, POLICY, LOW)
        for j in range(0, NV):
            dtb = mma(load_tile(du_c, 0, j, C, V, C, BV), tl.trans(load_tile(v_c, 0, j, C, V, C, BV)), dtb, False,
                      V_EXACT, POLICY, LOW)
        beta = tl.load(beta_ptr + chunk * C + tl.arange(0, C))
        store_tile(dt_ptr + chunk * C * C, dtb * beta[None, :], 0, 0, C, C, C, C)
        tl.store(dbeta_ptr + chunk * C + tl.arange(0, C), tl.sum(dtb * t, 0))


def _wy_fwd_fake(t, k, v, beta, policy, low, num_warps=0, num_stages=0):
    return f32(*k.shape, like=k), f32(*v.shape, like=k)


@define_op("wy_fwd", _wy_fwd_fake)
def wy_fwd(t: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, policy: str,
           low: torch.dtype, num_warps: int = 0, num_stages: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, C, K = k.shape
    V = v.shape[-1]
    w, u = _wy_fwd_fake(t, k, v, beta, policy, low)
    POLICY, LOW = precision(policy, low)
    BK, BV = block(K), block(V)
    launch(wy_fwd_kernel, (triton.cdiv(K, BK) + triton.cdiv(V, BV), B * H * N), t, k, v, beta, w, u, K=K, V=V, C=C,
           BK=BK, BV=BV, K_EXACT=exact(k, low), V_EXACT=exact(v, low), POLICY=POLICY, LOW=LOW,
           **launch_options(num_warps or (4 if C <= 64 else 8), num_stages))
    return w, u


def _wy_bwd_fake(t, k, v, beta, dw, du, policy, low, num_warps=0, num_stages=0):
    return f32(*t.shape, like=k), f32(*k.shape, like=k), f32(*v.shape, like=k), f32(*beta.shape, like=k)


@define_op("wy_bwd", _wy_bwd_fake)
def wy_bwd(t: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, dw: torch.Tensor,
           du: torch.Tensor, policy: str, low: torch.dtype, num_warps: int = 0, num_stages: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, C, K = k.shape
    V = v.shape[-1]
    dt, dk, dv, dbeta = _wy_bwd_fake(t, k, v, beta, dw, du, policy, low)
    POLICY, LOW = precision(policy, low)
    BK, BV = block(K), block(V)
    launch(wy_bwd_kernel, (triton.cdiv(K, BK) + triton.cdiv(V, BV) + 1, B * H * N), t, k, v, beta, dw, du, dt, dk,
           dv, dbeta, K=K, V=V, C=C, BK=BK, BV=BV, K_EXACT=exact(k, low), V_EXACT=exact(v, low), POLICY=POLICY,
           LOW=LOW, **launch_options(num_warps or (4 if C <= 64 else 8), num_stages))
    return dt, dk, dv, dbeta


def wy_forward(t, k, v, beta, dot, config=None):
    """The registered `wy` stage: (w, u), float32."""
    check_tensors(t, k, v, beta)
    policy, low = policy_of(dot)
    return wy_fwd(t.contiguous(), k.contiguous(), v.contiguous(), beta.float().contiguous(), policy, low,
                  *warps_stages(config))


def wy_backward(t, k, v, beta, dw, du, dot, config=None):
    """The registered `wy_backward` stage: (dt, dk, dv, dbeta), float32."""
    check_tensors(t, k, v, beta, dw, du)
    policy, low = policy_of(dot)
    return wy_bwd(t.contiguous(), k.contiguous(), v.contiguous(), beta.float().contiguous(), dw.contiguous(),
                  du.contiguous(), policy, low, *warps_stages(config))
