"""Ground truth for the delta rule: plain PyTorch, float64, one token (or one chunk) at a time.

`recurrent_delta_rule_ref` is the oracle every fast path is tested against. It is differentiable
(plain autograd through the loop), so tests take reference gradients from it too.
`chunk_delta_rule_ref` is the textbook chunkwise form (WY/UT transform, one chunk a step), kept as a
readable statement of the algorithm the fast paths implement.

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; states [N, H, K, V] where N is B, or the
number of packed sequences when `cu_seqlens` is given (then B must be 1).
"""

from __future__ import annotations

import torch

__all__ = ["l2norm", "recurrent_delta_rule_ref", "chunk_delta_rule_ref"]

L2NORM_EPS = 1e-6  # as in fla's l2norm, so `use_qk_l2norm` means the same thing in both libraries


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _sequences(T: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, T)]
    bounds = [int(x) for x in cu_seqlens.tolist()]
    return list(zip(bounds[:-1], bounds[1:]))


def _prepare(q, k, v, beta, scale, initial_state, cu_seqlens, use_qk_l2norm):
    q, k, v, beta = (x.to(torch.float64) for x in (q, k, v, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, T, H, K = k.shape
    V = v.shape[-1]
    n_states = B if cu_seqlens is None else len(cu_seqlens) - 1
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs batch size 1, got B={B}")
    if initial_state is None:
        initial_state = q.new_zeros(n_states, H, K, V)
    return q * scale, k, v, beta, initial_state.to(torch.float64)


def recurrent_delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sequential recurrence in float64; returns float64 `(o, final_state or None)`.

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T,   o_t = S_t^T q_t * scale
    """
    q, k, v, beta, h0 = _prepare(q, k, v, beta, scale, initial_state, cu_seqlens, use_qk_l2norm)
    B, T = q.shape[:2]
    outputs, finals = [], []
    for b in range(B):
        for i, (start, end) in enumerate(_sequences(T, cu_seqlens)):
            S = h0[b if cu_seqlens is None else i]  # [H, K, V]
            for t in range(start, end):
                k_t, v_t, b_t = k[b, t], v[b, t], beta[b, t]  # [H, K], [H, V], [H]
                v_old = torch.einsum("hkv,hk->hv", S, k_t)
                S = S + torch.einsum("hk,hv->hkv", k_t, b_t[:, None] * (v_t - v_old))
                outputs.append(torch.einsum("hkv,hk->hv", S, q[b, t]))
            finals.append(S)
    o = torch.stack(outputs).reshape(B, T, *v.shape[2:]) if outputs else v.new_zeros(v.shape)
    return o, (torch.stack(finals) if output_final_state else None)


def chunk_delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunkwise algorithm of Yang et al. (2024), one chunk a step, float64.

    Per chunk: A = tril(diag(beta) K K^T, -1); T = (I + A)^-1; W = T diag(beta) K; U = T diag(beta) V;
    V_new = U - W S; O = Q S + tril(Q K^T) V_new; S <- S + K^T V_new.
    """
    q, k, v, beta, S = _prepare(q, k, v, beta, scale, initial_state, None, use_qk_l2norm)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    beta = beta.transpose(1, 2)
    T = q.shape[2]
    outputs = []
    for start in range(0, T, chunk_size):
        sl = slice(start, start + chunk_size)
        q_c, k_c, v_c, b_c = q[:, :, sl], k[:, :, sl], v[:, :, sl], beta[:, :, sl, None]
        eye = torch.eye(k_c.shape[2], dtype=k_c.dtype, device=k_c.device)
        a = torch.tril(b_c * k_c @ k_c.transpose(-1, -2), -1)
        t_inv = torch.linalg.solve_triangular(eye + a, eye.expand_as(a), upper=False, unitriangular=True)
        w, u = t_inv @ (b_c * k_c), t_inv @ (b_c * v_c)
        v_new = u - w @ S
        outputs.append(q_c @ S + torch.tril(q_c @ k_c.transpose(-1, -2)) @ v_new)
        S = S + k_c.transpose(-1, -2) @ v_new
    o = torch.cat(outputs, dim=2).transpose(1, 2)
    return o, (S if output_final_state else None)
