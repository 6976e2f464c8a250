"""Stage 2, `wy`: the WY/UT factors W = T diag(beta) K and U = T diag(beta) V of every chunk.

beta scales T's columns (float32) rather than K's rows, so K and V enter the products exactly.
"""

from __future__ import annotations

import torch

from .matmul import Dot, dot_add


def wy(t: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, dot: Dot):
    tb = t * beta[..., None, :]
    return dot(tb, k), dot(tb, v)


def wy_backward(t, k, v, beta, dw, du, dot: Dot):
    """Returns (dt, dk, dv, dbeta) of W = (T diag(beta)) K, U = (T diag(beta)) V."""
    tb = t * beta[..., None, :]
    dtb = dot_add(dot(dw, k.transpose(-1, -2)), du, v.transpose(-1, -2), dot)
    tbt = tb.transpose(-1, -2)
    return dtb * beta[..., None, :], dot(tbt, dw), dot(tbt, du), (dtb * t).sum(-2)
