"""Token layout <-> chunk layout.

Public tensors are token-major, [B, T, H, D] (fla's layout). The chunk stages work on
[B, H, N, C, D]: N = ceil(T / C) chunks of C rows, batched over (B, H, N); `to_chunks` hands them
out as [B, H, N/g, g, C, D] so a compiled graph sees N/g as an input size (state.py says why). A ragged last chunk is
zero-padded; zero keys and zero beta make padded rows exact no-ops for the state, and their outputs
are dropped by `from_chunks`. Each conversion is one copy.
"""

from __future__ import annotations

import torch


def num_chunks(T: int, chunk_size: int) -> int:
    return (T + chunk_size - 1) // chunk_size


def to_chunks(x: torch.Tensor, chunk_size: int, dtype: torch.dtype, group: int = 1) -> torch.Tensor:
    """[B, T, H, *D] -> [B, H, N/g, g, C, *D] in `dtype`, zero-padded to N * C rows with N a
    multiple of the group size g (the two-level state pass takes g chunks at a time)."""
    B, T, H = x.shape[:3]
    N = num_chunks(T, chunk_size * group) * group
    out = x.new_empty(B, H, N * chunk_size, *x.shape[3:], dtype=dtype)
    out[:, :, :T] = x.transpose(1, 2)
    out[:, :, T:] = 0
    return out.view(B, H, N // group, group, chunk_size, *x.shape[3:])


def from_chunks(x: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, N, C, *D] -> [B, T, H, *D] in `dtype`, dropping the padded rows."""
    B, H, N, C = x.shape[:4]
    return x.reshape(B, H, N * C, *x.shape[4:])[:, :, :T].transpose(1, 2).to(dtype).contiguous()
