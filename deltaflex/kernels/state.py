"""Stage 3, the state pass, as single-launch Triton kernels that loop over every chunk.

Forward (`state_fwd_kernel`): one program per (batch*head, block of BV value columns) keeps its
[K, BV] slice of the state in registers and walks the N chunks in order:
    states[n] = S;  V_new_n = U_n - W_n S;  S <- S + K_n^T V_new_n.
Backward (`state_bwd_kernel`): the same grid walks the chunks in reverse with dS:
    ds_next[n] = dS;  dV_new_n = dV_local_n + K_n dS;  dS <- dS + scale Q_n^T dO_n - W_n^T dV_new_n,
then `state_grads_kernel`, one program per (chunk, block of BK key columns), forms
dK_n = V_new_n ds_next[n]^T and dW_n = -dV_new_n states[n]^T over blocks of BV values.

Grid: (cdiv(V, BV), B*H) for the passes, (cdiv(K, BK), B*H*N) for the gradients. Blocks: BK covers
all of K in the passes (next power of two, >= 16, masked), BV from `pass_config`; C (the chunk size)
is one tile. ds_next is materialised only inside the backward stage's call (float32, transient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import block, check_tensors, define_op, exact, f32, launch, mma, policy_of, precision


def pass_config(K: int, V: int) -> dict:
    """BV and warps of a state-pass program: the [K, BV] float32 state and its bf16 halves must stay
    in registers, so wide keys take narrower value blocks."""
    BK = block(K, 256)
    BV = block(V, 64 if BK <= 64 else 32 if BK <= 128 else 16)
    return dict(BV=BV, num_warps=4 if BK * BV <= 4096 else 8)


@triton.jit
def state_fwd_kernel(k_ptr, w_ptr, u_ptr, s0_ptr, v_new_ptr, states_ptr, final_ptr, N,
                     K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     K_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr):
    iv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rc, rk, rv = tl.arange(0, C), tl.arange(0, BK), iv * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    m_kv = mk[:, None] & mv[None, :]
    kv = rk[:, None] * V + rv[None, :]
    s = tl.load(s0_ptr + bh * K * V + kv, mask=m_kv, other=0.0)
    for n in range(N):
        chunk = bh * N + n
        tl.store(states_ptr + chunk * K * V + kv, s, mask=m_kv)
        ck = chunk * C * K + rc[:, None] * K + rk[None, :]
        cv = chunk * C * V + rc[:, None] * V + rv[None, :]
        w = tl.load(w_ptr + ck, mask=mk[None, :], other=0.0)
        u = tl.load(u_ptr + cv, mask=mv[None, :], other=0.0)
        v_new = u - mma(w, s, tl.zeros([C, BV], tl.float32), False, False, POLICY, LOW)
        tl.store(v_new_ptr + cv, v_new, mask=mv[None, :])
        k = tl.load(k_ptr + ck, mask=mk[None, :], other=0.0)
        s = mma(tl.trans(k), v_new, s, K_EXACT, False, POLICY, LOW)
    tl.store(final_ptr + bh * K * V + kv, s, mask=m_kv)


@triton.jit
def state_bwd_kernel(q_ptr, k_ptr, w_ptr, do_ptr, dv_local_ptr, ds_final_ptr, dv_new_ptr, ds_next_ptr, ds0_ptr,
                     scale, N,
                     K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     Q_EXACT: tl.constexpr, K_EXACT: tl.constexpr, DO_EXACT: tl.constexpr,
                     POLICY: tl.constexpr, LOW: tl.constexpr):
    iv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rc, rk, rv = tl.arange(0, C), tl.arange(0, BK), iv * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    m_kv = mk[:, None] & mv[None, :]
    kv = rk[:, None] * V + rv[None, :]
    ds = tl.load(ds_final_ptr + bh * K * V + kv, mask=m_kv, other=0.0)
    for i in range(N):
        chunk = bh * N + (N - 1 - i)
        tl.store(ds_next_ptr + chunk * K * V + kv, ds, mask=m_kv)
        ck = chunk * C * K + rc[:, None] * K + rk[None, :]
        cv = chunk * C * V + rc[:, None] * V + rv[None, :]
        k = tl.load(k_ptr + ck, mask=mk[None, :], other=0.0)
        dv_new = mma(k, ds, tl.load(dv_local_ptr + cv, mask=mv[None, :], other=0.0), K_EXACT, False, POLICY, LOW)
        tl.store(dv_new_ptr + cv, dv_new, mask=mv[None, :])
        q = tl.load(q_ptr + ck, mask=mk[None, :], other=0.0)
        do = tl.load(do_ptr + cv, mask=mv[None, :], other=0.0)
        qdo = mma(tl.trans(q), do, tl.zeros([BK, BV], tl.float32), Q_EXACT, DO_EXACT, POLICY, LOW)
        w = tl.load(w_ptr + ck, mask=mk[None, :], other=0.0)
        ds = mma(tl.trans(w), -dv_new, ds + scale * qdo, False, False, POLICY, LOW)
    tl.store(ds0_ptr + bh * K * V + kv, ds, mask=m_kv)


@triton.jit
def state_grads_kernel(v_new_ptr, dv_new_ptr, states_ptr, ds_next_ptr, dk_ptr, dw_ptr,
                       K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       POLICY: tl.constexpr, LOW: tl.constexpr):
    ik, chunk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rc, rk = tl.arange(0, C), ik * BK + tl.arange(0, BK)
    mk = rk < K
    dk = tl.zeros([C, BK], tl.float32)
    dw = tl.zeros([C, BK], tl.float32)
    for v0 in range(0, V, BV):
        rv = v0 + tl.arange(0, BV)
        mv = rv < V
        cv = chunk * C * V + rc[:, None] * V + rv[None, :]
        vk = chunk * K * V + rk[None, :] * V + rv[:, None]  # [BV, BK]: a state block, transposed
        m_vk = mv[:, None] & mk[None, :]
        v_new = tl.load(v_new_ptr + cv, mask=mv[None, :], other=0.0)
        dk = mma(v_new, tl.load(ds_next_ptr + vk, mask=m_vk, other=0.0), dk, False, False, POLICY, LOW)
        dv_new = tl.load(dv_new_ptr + cv, mask=mv[None, :], other=0.0)
        dw = mma(-dv_new, tl.load(states_ptr + vk, mask=m_vk, other=0.0), dw, False, False, POLICY, LOW)
    ck = chunk * C * K + rc[:, None] * K + rk[None, :]
    tl.store(dk_ptr + ck, dk, mask=mk[None, :])
    tl.store(dw_ptr + ck, dw, mask=mk[None, :])


def _state_fwd_fake(k, w, u, s0, policy, low):
    B, H, N, C, K = k.shape
    V = u.shape[-1]
    return f32(B, H, N, C, V, like=k), f32(B, H, N, K, V, like=k), f32(B, H, K, V, like=k)


@define_op("state_fwd", _state_fwd_fake)
def state_fwd(k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, s0: torch.Tensor, policy: str,
              low: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, C, K = k.shape
    V = u.shape[-1]
    v_new, states, final = _state_fwd_fake(k, w, u, s0, policy, low)
    POLICY, LOW = precision(policy, low)
    cfg = pass_config(K, V)
    grid = (triton.cdiv(V, cfg["BV"]), B * H)
    launch(state_fwd_kernel, grid, k, w, u, s0, v_new, states, final, N, K=K, V=V, C=C, BK=block(K, 256),
           K_EXACT=exact(k, low), POLICY=POLICY, LOW=LOW, **cfg)
    return v_new, states, final


def _state_bwd_fake(q, k, w, v_new, states, do, dv_local, ds_final, scale, policy, low):
    B, H, N, C, K = k.shape
    V = v_new.shape[-1]
    return f32(B, H, N, C, V, like=k), f32(B, H, N, C, K, like=k), f32(B, H, N, C, K, like=k), f32(B, H, K, V, like=k)


@define_op("state_bwd", _state_bwd_fake)
def state_bwd(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, v_new: torch.Tensor, states: torch.Tensor,
              do: torch.Tensor, dv_local: torch.Tensor, ds_final: torch.Tensor, scale: float, policy: str,
              low: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, C, K = k.shape
    V = v_new.shape[-1]
    dv_new, dw, dk, ds0 = _state_bwd_fake(q, k, w, v_new, states, do, dv_local, ds_final, scale, policy, low)
    ds_next = f32(B, H, N, K, V, like=k)
    POLICY, LOW = precision(policy, low)
    cfg = pass_config(K, V)
    launch(state_bwd_kernel, (triton.cdiv(V, cfg["BV"]), B * H), q, k, w, do, dv_local, ds_final, dv_new, ds_next,
           ds0, scale, N, K=K, V=V, C=C, BK=block(K, 256), Q_EXACT=exact(q, low), K_EXACT=exact(k, low),
           DO_EXACT=exact(do, low), POLICY=POLICY, LOW=LOW, **cfg)
    BK = block(K)
    launch(state_grads_kernel, (triton.cdiv(K, BK), B * H * N), v_new, dv_new, states, ds_next, dk, dw,
           K=K, V=V, C=C, BK=BK, BV=block(V), POLICY=POLICY, LOW=LOW)
    return dv_new, dw, dk, ds0


def state_forward(k, w, u, s0, dot, impl=None):
    """The registered `state` stage: (v_new, states, final); `impl` is the compiled backend's."""
    check_tensors(k, w, u, s0)
    policy, low = policy_of(dot)
    return state_fwd(k.contiguous(), w.contiguous(), u.contiguous(), s0.contiguous(), policy, low)


def state_backward(q, k, w, v_new, states, do, dv_local, ds_final, scale, dot, impl=None):
    """The registered `state_backward` stage: (dv_new, dw, dk, ds0)."""
    check_tensors(q, k, w, v_new, states, do, dv_local, ds_final)
    policy, low = policy_of(dot)
    args = (q, k, w, v_new, states, do, dv_local, ds_final)
    return state_bwd(*(x.contiguous() for x in args), float(scale), policy, low)
