"""Stage 4, `output`: O = Q S_n + tril(Q K^T) V_new per chunk (Q already scaled), and its gradients."""

from __future__ import annotations

import torch


def output(q: torch.Tensor, k: torch.Tensor, v_new: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    return q @ states + torch.tril(q @ k.transpose(-1, -2)) @ v_new


def output_backward(q, k, v_new, states, do):
    """Returns (dq, dk, dv_new, dstates) of `output`, with q the scaled queries."""
    dov = torch.tril(do @ v_new.transpose(-1, -2))
    dq = do @ states.transpose(-1, -2) + dov @ k
    dk = dov.transpose(-1, -2) @ q
    dv_new = torch.tril(q @ k.transpose(-1, -2)).transpose(-1, -2) @ do
    dstates = q.transpose(-1, -2) @ do
    return dq, dk, dv_new, dstates
