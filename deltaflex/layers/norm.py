"""Per-head output norms of the DeltaNet layer: RMSNorm, and RMSNorm gated by SiLU(g) (fla's
FusedRMSNormGated with its default activation). Both normalise over the last dimension in float32
(at least) and return the input's dtype; parameter names follow fla's, so its weights load."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension, in float32 or wider."""
    acc = torch.promote_types(x.dtype, torch.float32)
    x = x.to(acc)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """rms_norm(x) * weight * silu(g)."""

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        y = rms_norm(x, self.weight, self.eps)
        return (y * F.silu(g.to(y.dtype))).to(x.dtype)
