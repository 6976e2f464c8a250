"""`delta_rule_step`: the delta rule in its recurrent form, for one token or a few (decoding).

Per token, with S the state [B, H, K, V]:
    u_t = beta_t (v_t - S^T k_t),   S <- S + k_t u_t^T,   o_t = scale * S^T q_t.
The output is taken as `S_old^T q + (k . q) u`, so a token reads the old state once (two K-reductions
that fuse into one pass) and writes the new state once; under torch.compile the step becomes a few
fused kernels with static shapes and no host syncs, so it can be replayed under CUDA graphs.

For training-size inputs use `delta_rule` (chunkwise): this form loops over tokens.
"""

from __future__ import annotations

import functools

import torch

from .reference import l2norm
from .validation import check_delta_rule_inputs, state_dtype

__all__ = ["delta_rule_step"]


def delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    compile: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule for a few tokens from a recurrent state; returns the state after them.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H] (q's dtype or float32). T is small
            (1 when decoding): the tokens are processed one after another.
        state: [B, H, K, V], float32 (float64 with float64 inputs); None means zeros.
        scale: defaults to K ** -0.5.
        use_qk_l2norm: L2-normalise q and k first (as `delta_rule`'s option).
        compile: run through torch.compile(fullgraph=True); None: on CUDA only. Inside a caller's
            torch.compile the ops are traced into the caller's graph either way.

    Returns:
        (o [B, T, H, V] in q's dtype, the new state [B, H, K, V] in the state dtype).
        The input state is not modified. Gradients flow by plain autograd.
    """
    scale = check_delta_rule_inputs(q, k, v, beta, scale, state, None)
    if compile is None:
        compile = q.device.type == "cuda"
    step = _compiled_steps() if compile and not torch.compiler.is_compiling() else recurrent_steps
    return step(q, k, v, beta, state, scale, bool(use_qk_l2norm))


def recurrent_steps(q, k, v, beta, state, scale: float, use_qk_l2norm: bool):
    """delta_rule_step without argument checks: a token loop, unrolled when traced (T is static)."""
    acc = state_dtype(q.dtype)
    out_dtype = q.dtype
    q, k, v, beta = (x.to(acc) for x in (q, k, v, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    B, T, H, K = q.shape
    s = q.new_zeros(B, H, K, v.shape[-1]) if state is None else state.to(acc)
    outputs = []
    for t in range(T):
        o_t, s = token_update(s, q[:, t] * scale, k[:, t], v[:, t], beta[:, t])
        outputs.append(o_t)
    return torch.stack(outputs, dim=1).to(out_dtype), s


def token_update(s, q, k, v, beta):
    """One token: s [B, H, K, V]; q, k [B, H, K] (q already scaled); v [B, H, V]; beta [B, H]."""
    # Multiply-and-sum rather than einsum: Inductor fuses these reductions, but not a bmm call.
    k_s = (s * k[..., :, None]).sum(-2)  # S^T k, [B, H, V]
    q_s = (s * q[..., :, None]).sum(-2)  # S^T q
    u = beta[..., None] * (v - k_s)
    o = q_s + (q * k).sum(-1, keepdim=True) * u  # (S + k u^T)^T q without re-reading S
    return o, s + k[..., :, None] * u[..., None, :]


@functools.cache
def _compiled_steps():
    # dynamic=False: decoding runs a few fixed shapes, each best served by its own specialised kernels
    return torch.compile(recurrent_steps, fullgraph=True, dynamic=False)
