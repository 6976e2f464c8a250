"""Stage 4, `output`: O = scale (Q S_n + tril(Q K^T) V_new) per chunk, and its gradients.

Scales and sums ride inside the products (`dot_add`, `scaled_dot`) and masks are applied in place:
on a CPU a separate pass over a chunk-layout tensor costs a fifth to a half of a chunk product.
"""

from __future__ import annotations

import torch

from .matmul import Dot, dot_add, scaled_dot


def output(q, k, v_new, states, scale: float, dot: Dot) -> torch.Tensor:
    scores = dot(q, k.transpose(-1, -2)).tril_()
    return dot_add(dot(q, states), scores, v_new, dot, alpha=scale, beta=scale)


def output_backward(q, k, v_new, states, do, scale: float, dot: Dot):
    """Returns (dq, dk, dv_new) of `output`; its gradient for the states is taken in the reverse
    state pass (`state.state_pass_backward`)."""
    dov = dot(do, v_new.transpose(-1, -2)).tril_()  # unscaled: under bf16 policies it is rounded as the kernels do
    scores = dot(q, k.transpose(-1, -2)).tril_()
    dq = dot_add(scaled_dot(do, states.transpose(-1, -2), dot, scale), dov, k, dot, alpha=scale)
    dk = scaled_dot(dov.transpose(-1, -2), q, dot, scale)
    dv_new = scaled_dot(scores.transpose(-1, -2), do, dot, scale)
    return dq, dk, dv_new
