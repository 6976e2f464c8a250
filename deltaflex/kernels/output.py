"""Stage 4, the output, and its gradients, one Triton program per chunk (and block of values).

Forward (`output_fwd_kernel`): O = scale (Q S_n + tril(Q K^T) V_new) for one chunk and BV value
columns; the C x C scores are accumulated over BK-blocks of the key dim.
Backward (`output_bwd_kernel`): per chunk, with dO V_new^T and the scores kept as C x C tiles,
    dQ = scale (dO S_n^T + tril(dO V_new^T) K),  dK = scale tril(dO V_new^T)^T Q,
    dV_local = scale tril(Q K^T)^T dO,
looping over BK-blocks of keys and BV-blocks of values.

Grid: (cdiv(V, BV), B*H*N) forward, (B*H*N,) backward. Blocks: C (the chunk) is one tile;
BK, BV <= 64 (powers of two, masked where the head dims are not).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import block, check_tensors, define_op, exact, f32, launch, mma, policy_of, precision


@triton.jit
def output_fwd_kernel(q_ptr, k_ptr, v_new_ptr, states_ptr, o_ptr, scale,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      Q_EXACT: tl.constexpr, K_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr):
    iv, chunk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rc, rv = tl.arange(0, C), iv * BV + tl.arange(0, BV)
    mv = rv < V
    scores = tl.zeros([C, C], tl.float32)
    o = tl.zeros([C, BV], tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < K
        ck = chunk * C * K + rc[:, None] * K + rk[None, :]
        q = tl.load(q_ptr + ck, mask=mk[None, :], other=0.0)
        k = tl.load(k_ptr + ck, mask=mk[None, :], other=0.0)
        s = tl.load(states_ptr + chunk * K * V + rk[:, None] * V + rv[None, :], mask=mk[:, None] & mv[None, :],
                    other=0.0)
        scores = mma(q, tl.trans(k), scores, Q_EXACT, K_EXACT, POLICY, LOW)
        o = mma(q, s, o, Q_EXACT, False, POLICY, LOW)
    scores = tl.where(rc[:, None] >= rc[None, :], scores, 0.0)
    cv = chunk * C * V + rc[:, None] * V + rv[None, :]
    o = mma(scores, tl.load(v_new_ptr + cv, mask=mv[None, :], other=0.0), o, False, False, POLICY, LOW)
    tl.store(o_ptr + cv, scale * o, mask=mv[None, :])


@triton.jit
def output_bwd_kernel(q_ptr, k_ptr, v_new_ptr, states_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, scale,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      Q_EXACT: tl.constexpr, K_EXACT: tl.constexpr, DO_EXACT: tl.constexpr,
                      POLICY: tl.constexpr, LOW: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, C)
    lower = rc[:, None] >= rc[None, :]
    dov = tl.zeros([C, C], tl.float32)
    for v0 in range(0, V, BV):
        rv = v0 + tl.arange(0, BV)
        cv = chunk * C * V + rc[:, None] * V + rv[None, :]
        do = tl.load(do_ptr + cv, mask=(rv < V)[None, :], other=0.0)
        v_new = tl.load(v_new_ptr + cv, mask=(rv < V)[None, :], other=0.0)
        dov = mma(do, tl.trans(v_new), dov, DO_EXACT, False, POLICY, LOW)
    dov = tl.where(lower, dov, 0.0)
    scores = tl.zeros([C, C], tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < K
        ck = chunk * C * K + rc[:, None] * K + rk[None, :]
        q = tl.load(q_ptr + ck, mask=mk[None, :], other=0.0)
        k = tl.load(k_ptr + ck, mask=mk[None, :], other=0.0)
        scores = mma(q, tl.trans(k), scores, Q_EXACT, K_EXACT, POLICY, LOW)
        dq = mma(dov, k, tl.zeros([C, BK], tl.float32), False, K_EXACT, POLICY, LOW)
        for v0 in range(0, V, BV):
            rv = v0 + tl.arange(0, BV)
            mv = rv < V
            do = tl.load(do_ptr + chunk * C * V + rc[:, None] * V + rv[None, :], mask=mv[None, :], other=0.0)
            s_t = tl.load(states_ptr + chunk * K * V + rk[None, :] * V + rv[:, None], mask=mv[:, None] & mk[None, :],
                          other=0.0)  # [BV, BK]: S_n^T
            dq = mma(do, s_t, dq, DO_EXACT, False, POLICY, LOW)
        tl.store(dq_ptr + ck, scale * dq, mask=mk[None, :])
        dk = mma(tl.trans(dov), q, tl.zeros([C, BK], tl.float32), False, Q_EXACT, POLICY, LOW)
        tl.store(dk_ptr + ck, scale * dk, mask=mk[None, :])
    scores = tl.where(lower, scores, 0.0)
    for v0 in range(0, V, BV):
        rv = v0 + tl.arange(0, BV)
        cv = chunk * C * V + rc[:, None] * V + rv[None, :]
        do = tl.load(do_ptr + cv, mask=(rv < V)[None, :], other=0.0)
        dv = mma(tl.trans(scores), do, tl.zeros([C, BV], tl.float32), False, DO_EXACT, POLICY, LOW)
        tl.store(dv_ptr + cv, scale * dv, mask=(rv < V)[None, :])


def _output_fwd_fake(q, k, v_new, states, scale, policy, low):
    return f32(*v_new.shape, like=q)


@define_op("output_fwd", _output_fwd_fake)
def output_fwd(q: torch.Tensor, k: torch.Tensor, v_new: torch.Tensor, states: torch.Tensor, scale: float,
               policy: str, low: torch.dtype) -> torch.Tensor:
    B, H, N, C, K = q.shape
    V = v_new.shape[-1]
    o = _output_fwd_fake(q, k, v_new, states, scale, policy, low)
    POLICY, LOW = precision(policy, low)
    BV = block(V)
    launch(output_fwd_kernel, (triton.cdiv(V, BV), B * H * N), q, k, v_new, states, o, scale, K=K, V=V, C=C,
           BK=block(K), BV=BV, Q_EXACT=exact(q, low), K_EXACT=exact(k, low), POLICY=POLICY, LOW=LOW,
           num_warps=4 if C <= 64 else 8)
    return o


def _output_bwd_fake(q, k, v_new, states, do, scale, policy, low):
    return f32(*q.shape, like=q), f32(*k.shape, like=q), f32(*v_new.shape, like=q)


@define_op("output_bwd", _output_bwd_fake)
def output_bwd(q: torch.Tensor, k: torch.Tensor, v_new: torch.Tensor, states: torch.Tensor, do: torch.Tensor,
               scale: float, policy: str, low: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, C, K = q.shape
    V = v_new.shape[-1]
    dq, dk, dv = _output_bwd_fake(q, k, v_new, states, do, scale, policy, low)
    POLICY, LOW = precision(policy, low)
    launch(output_bwd_kernel, (B * H * N,), q, k, v_new, states, do, dq, dk, dv, scale, K=K, V=V, C=C,
           BK=block(K), BV=block(V), Q_EXACT=exact(q, low), K_EXACT=exact(k, low), DO_EXACT=exact(do, low),
           POLICY=POLICY, LOW=LOW, num_warps=4 if C <= 64 else 8)
    return dq, dk, dv


def output_forward(q, k, v_new, states, scale, dot):
    """The registered `output` stage: o [B, H, N, C, V], float32."""
    check_tensors(q, k, v_new, states)
    policy, low = policy_of(dot)
    return output_fwd(q.contiguous(), k.contiguous(), v_new.contiguous(), states.contiguous(), float(scale), policy,
                      low)


def output_backward(q, k, v_new, states, do, scale, dot):
    """The registered `output_backward` stage: (dq, dk, dv_local), float32."""
    check_tensors(q, k, v_new, states, do)
    policy, low = policy_of(dot)
    args = (q, k, v_new, states, do)
    return output_bwd(*(x.contiguous() for x in args), float(scale), policy, low)
