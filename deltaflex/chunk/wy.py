"""Stage 2, `wy`: the WY/UT factors W = T diag(beta) K and U = T diag(beta) V of every chunk."""

from __future__ import annotations

import torch


def wy(t: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = beta[..., None]
    return t @ (b * k), t @ (b * v)


def wy_backward(t, k, v, beta, dw, du):
    """Returns (dt, dk, dv, dbeta) of W = T (beta K), U = T (beta V)."""
    b = beta[..., None]
    dt = dw @ (b * k).transpose(-1, -2) + du @ (b * v).transpose(-1, -2)
    tt = t.transpose(-1, -2)
    dbk, dbv = tt @ dw, tt @ du
    dbeta = (dbk * k).sum(-1) + (dbv * v).sum(-1)
    return dt, b * dbk, b * dbv, dbeta
