"""Token layout <-> chunk layout.

Public tensors are token-major, [B, T, H, D] (fla's layout). The chunk stages work on
[B, H, N, C, D]: N = ceil(T / C) chunks of C rows, batched over (B, H, N). A ragged last chunk is
zero-padded; zero keys and zero beta make padded rows exact no-ops for the state, and their outputs
are dropped by `from_chunks`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def num_chunks(T: int, chunk_size: int) -> int:
    return (T + chunk_size - 1) // chunk_size


def to_chunks(x: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, *D] -> [B, H, N, C, *D] in `dtype`, zero-padded to N * C rows."""
    B, T, H = x.shape[:3]
    N = num_chunks(T, chunk_size)
    pad = N * chunk_size - T
    x = x.to(dtype)
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    return x.reshape(B, N, chunk_size, H, *x.shape[3:]).movedim(3, 1).contiguous()


def from_chunks(x: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, N, C, *D] -> [B, T, H, *D] in `dtype`, dropping the padded rows."""
    B, H, N, C = x.shape[:4]
    x = x.movedim(1, 3).reshape(B, N * C, H, *x.shape[4:])
    return x[:, :T].to(dtype).contiguous()
