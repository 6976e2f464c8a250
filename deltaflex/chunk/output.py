"""Stage 4, `output`: O = scale (Q S_n + tril(Q K^T) V_new) per chunk, and its gradients."""

from __future__ import annotations

import torch

from .matmul import Dot


def output(q, k, v_new, states, scale: float, dot: Dot) -> torch.Tensor:
    scores = torch.tril(dot(q, k.transpose(-1, -2)))
    return scale * (dot(q, states) + dot(scores, v_new))


def output_backward(q, k, v_new, states, do, scale: float, dot: Dot):
    """Returns (dq, dk, dv_new) of `output`; its gradient for the states is taken in the reverse
    state pass (`state.state_pass_backward`)."""
    dov = torch.tril(dot(do, v_new.transpose(-1, -2)))
    scores = torch.tril(dot(q, k.transpose(-1, -2)))
    dq = scale * (dot(do, states.transpose(-1, -2)) + dot(dov, k))
    dk = scale * dot(dov.transpose(-1, -2), q)
    dv_new = scale * dot(scores.transpose(-1, -2), do)
    return dq, dk, dv_new
