"""`delta_rule_step`: the delta rule in its recurrent form, for one token or a few (decoding).

Per token, with S the state [B, H, K, V]:
    u_t = beta_t (v_t - S^T k_t),   S <- S + k_t u_t^T,   o_t = scale * S^T q_t.
The output is taken as `S_old^T q + (k . q) u`, so a token needs the old state only for two
K-reductions (which can share one pass) besides writing the new state; under torch.compile the step
becomes a few fused kernels with static shapes and no host syncs, so it can be replayed under CUDA
graphs.

For training-size inputs use `delta_rule` (chunkwise): this form loops over tokens.
Backends: "compiled" (the ops above through torch.compile), "eager" (the same ops as they are) and
"triton" (a hand-written kernel, `deltaflex/kernels/recurrent_step.py`: one launch, the state read
and written once; forward only).
"""

from __future__ import annotations

import functools
import os

import torch

from .reference import l2norm
from .validation import check_delta_rule_inputs, state_dtype

try:
    from .kernels.recurrent_step import recurrent_step as triton_recurrent_step
except ImportError:  # no triton on this platform
    triton_recurrent_step = None

__all__ = ["delta_rule_step"]

BACKENDS = ("compiled", "eager", "triton")


def delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule for a few tokens from a recurrent state; returns the state after them.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H] (q's dtype or float32). T is small
            (1 when decoding): the tokens are processed one after another.
        state: [B, H, K, V], float32 (float64 with float64 inputs); None means zeros.
        scale: defaults to K ** -0.5.
        use_qk_l2norm: L2-normalise q and k first (as `delta_rule`'s option).
        backend: "compiled" (torch.compile(fullgraph=True) of the plain ops), "eager" (the plain ops)
            or "triton" (the hand-written kernel: CUDA, bf16/fp16/fp32 inputs, no gradient);
            None: `default_step_backend` ("triton" when decoding on CUDA, "compiled" when a
            gradient is needed there, "eager" elsewhere). Inside a caller's torch.compile the plain
            ops are traced into the caller's graph either way.

    Returns:
        (o [B, T, H, V] in q's dtype, the new state [B, H, K, V] in the state dtype).
        The input state is not modified. Gradients flow by plain autograd (not with "triton").
    """
    scale = check_delta_rule_inputs(q, k, v, beta, scale, state, None)
    if backend is None:
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, beta, state))
        backend = default_step_backend(q.device.type, q.dtype, needs_grad)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        return _triton_step(q, k, v, beta, state, scale, bool(use_qk_l2norm))
    step = _compiled_steps() if backend == "compiled" and not torch.compiler.is_compiling() else recurrent_steps
    return step(q, k, v, beta, state, scale, bool(use_qk_l2norm))


def default_step_backend(device_type: str, dtype: torch.dtype, needs_grad: bool) -> str:
    """On CUDA the hand-written kernel where it applies (no gradient, bf16/fp16/fp32): one launch a
    step, faster than fla's fused_recurrent_delta_rule on the H200 at batch 1, 8 and 64
    (docs/benchmarks.md), else the compiled plain ops; the plain ops eagerly elsewhere."""
    if device_type != "cuda":
        return "eager"
    if needs_grad or dtype == torch.float64 or triton_recurrent_step is None:
        return "compiled"
    return "triton"


def _triton_step(q, k, v, beta, state, scale, use_qk_l2norm):
    if triton_recurrent_step is None:
        raise ValueError("backend='triton' needs triton, which is not installed here; use backend='compiled'")
    # The interpreter (TRITON_INTERPRET=1) runs the kernel on CPU tensors: the tests use it.
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors, got {q.device}; use backend='eager' or 'compiled'")
    if q.dtype == torch.float64:
        raise TypeError("backend='triton' computes in float32 and takes bf16/fp16/fp32 inputs, got float64")
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, beta, state)):
        raise ValueError("backend='triton' has no backward; use backend='compiled' when gradients are needed")
    B, _, H, K = q.shape
    state = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32) if state is None else state.float()
    q, k, v, beta, state = (x.contiguous() for x in (q, k, v, beta, state))
    return triton_recurrent_step(q, k, v, beta, state, scale, use_qk_l2norm)


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
