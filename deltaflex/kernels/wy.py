"""Stage 2, the WY factors, and their gradients, one Triton program per chunk.

Forward (`wy_fwd_kernel`): with Tb = T diag(beta) (float32, C x C),
    W = Tb K,  U = Tb V,
over BK-blocks of keys and BV-blocks of values.
Backward (`wy_bwd_kernel`): dTb = dW K^T + dU V^T accumulated over the same blocks, while
    dK = Tb^T dW,  dV = Tb^T dU;
then dT = dTb diag(beta) and dbeta = column sums of dTb * T.

Grid: (B*H*N,). Blocks: C is one tile; BK, BV <= 64 (powers of two, masked).
"""

from __future__ import annotations

import torch
import triton.language as tl
import triton

from .common import block, check_tensors, define_op, exact, f32, launch, mma, policy_of, precision


@triton.jit
def _tile(ptr, chunk, rc, r, D: tl.constexpr, C: tl.constexpr):
    """The [C, len(r)] tile of columns r of a chunk of a [..., C, D] tensor (zeros past D)."""
    return tl.load(ptr + chunk * C * D + rc[:, None] * D + r[None, :], mask=(r < D)[None, :], other=0.0)


@triton.jit
def _store_tile(ptr, x, chunk, rc, r, D: tl.constexpr, C: tl.constexpr):
    tl.store(ptr + chunk * C * D + rc[:, None] * D + r[None, :], x, mask=(r < D)[None, :])


@triton.jit
def wy_fwd_kernel(t_ptr, k_ptr, v_ptr, beta_ptr, w_ptr, u_ptr,
                  K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, C)
    beta = tl.load(beta_ptr + chunk * C + rc)
    tb = _tile(t_ptr, chunk, rc, rc, C, C) * beta[None, :]
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        w = mma(tb, _tile(k_ptr, chunk, rc, rk, K, C), tl.zeros([C, BK], tl.float32), False, K_EXACT, POLICY, LOW)
        _store_tile(w_ptr, w, chunk, rc, rk, K, C)
    for v0 in range(0, V, BV):
        rv = v0 + tl.arange(0, BV)
        u = mma(tb, _tile(v_ptr, chunk, rc, rv, V, C), tl.zeros([C, BV], tl.float32), False, V_EXACT, POLICY, LOW)
        _store_tile(u_ptr, u, chunk, rc, rv, V, C)


@triton.jit
def wy_bwd_kernel(t_ptr, k_ptr, v_ptr, beta_ptr, dw_ptr, du_ptr, dt_ptr, dk_ptr, dv_ptr, dbeta_ptr,
                  K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, C)
    beta = tl.load(beta_ptr + chunk * C + rc)
    t = _tile(t_ptr, chunk, rc, rc, C, C)
    tb_t = tl.trans(t * beta[None, :])
    dtb = tl.zeros([C, C], tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        dw = _tile(dw_ptr, chunk, rc, rk, K, C)
        dtb = mma(dw, tl.trans(_tile(k_ptr, chunk, rc, rk, K, C)), dtb, False, K_EXACT, POLICY, LOW)
        dk = mma(tb_t, dw, tl.zeros([C, BK], tl.float32), False, False, POLICY, LOW)
        _store_tile(dk_ptr, dk, chunk, rc, rk, K, C)
    for v0 in range(0, V, BV):
        rv = v0 + tl.arange(0, BV)
        du = _tile(du_ptr, chunk, rc, rv, V, C)
        dtb = mma(du, tl.trans(_tile(v_ptr, chunk, rc, rv, V, C)), dtb, False, V_EXACT, POLICY, LOW)
        dv = mma(tb_t, du, tl.zeros([C, BV], tl.float32), False, False, POLICY, LOW)
        _store_tile(dv_ptr, dv, chunk, rc, rv, V, C)
    _store_tile(dt_ptr, dtb * beta[None, :], chunk, rc, rc, C, C)
    tl.store(dbeta_ptr + chunk * C + rc, tl.sum(dtb * t, 0))


def _wy_fwd_fake(t, k, v, beta, policy, low):
    return f32(*k.shape, like=k), f32(*v.shape, like=k)


@define_op("wy_fwd", _wy_fwd_fake)
def wy_fwd(t: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, policy: str,
           low: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, C, K = k.shape
    V = v.shape[-1]
    w, u = _wy_fwd_fake(t, k, v, beta, policy, low)
    POLICY, LOW = precision(policy, low)
    launch(wy_fwd_kernel, (B * H * N,), t, k, v, beta, w, u, K=K, V=V, C=C, BK=block(K), BV=block(V),
           K_EXACT=exact(k, low), V_EXACT=exact(v, low), POLICY=POLICY, LOW=LOW, num_warps=4 if C <= 64 else 8)
    return w, u


def _wy_bwd_fake(t, k, v, beta, dw, du, policy, low):
    return f32(*t.shape, like=k), f32(*k.shape, like=k), f32(*v.shape, like=k), f32(*beta.shape, like=k)


@define_op("wy_bwd", _wy_bwd_fake)
def wy_bwd(t: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, dw: torch.Tensor,
           du: torch.Tensor, policy: str, low: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, C, K = k.shape
    V = v.shape[-1]
    dt, dk, dv, dbeta = _wy_bwd_fake(t, k, v, beta, dw, du, policy, low)
    POLICY, LOW = precision(policy, low)
    launch(wy_bwd_kernel, (B * H * N,), t, k, v, beta, dw, du, dt, dk, dv, dbeta, K=K, V=V, C=C, BK=block(K),
           BV=block(V), K_EXACT=exact(k, low), V_EXACT=exact(v, low), POLICY=POLICY, LOW=LOW,
           num_warps=4 if C <= 64 else 8)
    return dt, dk, dv, dbeta


def wy_forward(t, k, v, beta, dot):
    """The registered `wy` stage: (w, u), float32."""
    check_tensors(t, k, v, beta)
    policy, low = policy_of(dot)
    return wy_fwd(t.contiguous(), k.contiguous(), v.contiguous(), beta.float().contiguous(), policy, low)


def wy_backward(t, k, v, beta, dw, du, dot):
    """The registered `wy_backward` stage: (dt, dk, dv, dbeta), float32."""
    check_tensors(t, k, v, beta, dw, du)
    policy, low = policy_of(dot)
    return wy_bwd(t.contiguous(), k.contiguous(), v.contiguous(), beta.float().contiguous(), dw.contiguous(),
                  du.contiguous(), policy, low)
