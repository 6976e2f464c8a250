"""Hand-written Triton kernel for `delta_rule_step` (backend="triton"): the recurrent form for a few
tokens in one launch that reads the state once and writes it once.

Computes, per (batch, head) and for t = 0 .. T-1, with S [K, V] in float32:
    u = beta_t (v_t - S^T k_t);  o_t = S^T q_t + (q_t . k_t) u  (= S_new^T q_t);  S <- S + k_t u^T
Grid: (cdiv(V, BV), B * H). A program owns the full K rows of a BV-wide column block of S (columns
update independently), holds it in registers across the T tokens, and writes it once at the end.
Blocks: BK = next power of two >= K (whole key dimension in one block), BV columns (16 or 32).
Registered with torch.library (`deltaflex::recurrent_step`, by common.define_op as the stage kernels
are), so torch.compile traces it and CUDA graphs capture it. Forward only: decoding needs no
gradient, and `delta_rule_step` refuses inputs that do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import L2NORM_EPS
from .common import define_op, launch


@triton.jit
def _recurrent_step_kernel(
    q, k, v, beta, s0, o, s1,  # q, k [B, T, H, K]; v, o [B, T, H, V]; beta [B, T, H]; s0, s1 [B, H, K, V]
    scale, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, USE_QK_L2NORM: tl.constexpr, EPS: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rows, cols = tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = rows < K, cols < V
    m_s = m_k[:, None] & m_v[None, :]
    state_offsets = i_bh.to(tl.int64) * K * V + rows[:, None] * V + cols[None, :]
    s = tl.load(s0 + state_offsets, mask=m_s, other=0.0).to(tl.float32)
    for t in range(T):
        token = (i_b.to(tl.int64) * T + t) * H + i_h
        q_t = tl.load(q + token * K + rows, mask=m_k, other=0.0).to(tl.float32)
        k_t = tl.load(k + token * K + rows, mask=m_k, other=0.0).to(tl.float32)
        v_t = tl.load(v + token * V + cols, mask=m_v, other=0.0).to(tl.float32)
        b_t = tl.load(beta + token).to(tl.float32)
        if USE_QK_L2NORM:
            q_t = q_t / tl.sqrt(tl.sum(q_t * q_t) + EPS)
            k_t = k_t / tl.sqrt(tl.sum(k_t * k_t) + EPS)
        q_t = (q_t * scale).to(tl.float32)  # torch.compile passes scale as fp64
        u = b_t * (v_t - tl.sum(s * k_t[:, None], axis=0))
        o_t = tl.sum(s * q_t[:, None], axis=0) + tl.sum(q_t * k_t) * u
        tl.store(o + token * V + cols, o_t.to(o.dtype.element_ty), mask=m_v)
        s = s + k_t[:, None] * u[None, :]
    tl.store(s1 + state_offsets, s, mask=m_s)


def _recurrent_step_fake(q, k, v, beta, state, scale, use_qk_l2norm):
    return torch.empty_like(v), torch.empty_like(state)


@define_op("recurrent_step", _recurrent_step_fake)
def recurrent_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
    scale: float, use_qk_l2norm: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H], float32 state [B, H, K, V]
    -> (o [B, T, H, V] in v's dtype, new float32 state)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    o, new_state = _recurrent_step_fake(q, k, v, beta, state, scale, use_qk_l2norm)
    BV = 32 if B * H * triton.cdiv(V, 32) >= 256 else 16  # small batches: more, narrower programs
    launch(_recurrent_step_kernel, (triton.cdiv(V, BV), B * H), q, k, v, beta, state, o, new_state, scale, T, H, K,
           V, BK=triton.next_power_of_2(K), BV=BV, USE_QK_L2NORM=use_qk_l2norm, EPS=L2NORM_EPS, num_warps=4)
    return o, new_state
