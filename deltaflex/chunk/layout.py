"""Token layout <-> chunk layout.

Public tensors are token-major, [B, T, H, D] (fla's layout). The chunk stages work on
[B, H, N, C, D]: N = ceil(T / C) chunks of C rows, batched over (B, H, N); `to_chunks` hands them
out as [B, H, N/g, g, C, D] so a compiled graph sees N/g as an input size (state.py says why). A ragged last chunk is
zero-padded; zero keys and zero beta make padded rows exact no-ops for the state, and their outputs
are dropped by `from_chunks`. Each conversion is one copy. Plans whose every stage is hand-written
skip `to_chunks` (and `to_chunks_packed`): the kernels read the caller's tensors and mask the rows
past T, or past each packed sequence's end (function.token_layout, Segments.rows).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

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
    rows = x.reshape(B, H, N * C, *x.shape[4:])[:, :, :T].transpose(1, 2)
    # always a fresh tensor (see graphs.py); out of place (torch 2.11's Dynamo lost the gradient of an
    # autograd.Function output written by copy_ into new_empty)
    return rows.to(dtype, memory_format=torch.contiguous_format, copy=True)


class Segments(NamedTuple):
    """Packed sequences (B = 1) in the chunk layout; every sequence starts on a chunk boundary (on a
    state-chunk boundary for a two-level pass), so chunks never mix sequences and only the state
    pass needs to know: it starts every sequence from its own initial state and hands back its own
    final state. Chunk-level tensors are [N/g, g] like the chunk layout; sequence-level ones [S]."""

    seq: torch.Tensor  # [N/g, g] int64: the sequence of every chunk
    first: torch.Tensor  # [N/g, g] bool: the chunk starts its sequence
    last: torch.Tensor  # [N/g, g] bool: the chunk ends its sequence
    first_chunk: torch.Tensor  # [S] int64: every sequence's first chunk (0 if it is empty)
    last_chunk: torch.Tensor  # [S] int64: every sequence's last chunk (0 if it is empty)
    empty: torch.Tensor  # [S] bool: the sequence has no tokens
    # [N, 2] int64: every chunk's first token among the packed T and its token count, for kernels that
    # read the packed tensors as they are (kernels.common.chunk_rows)
    rows: torch.Tensor | None = None


class PackedLayout(NamedTuple):
    """Where the tokens of packed sequences go in the chunk layout: each sequence is padded to
    whole chunks (whole groups of g chunks) of its own, so no chunk holds two sequences."""

    slots: torch.Tensor  # [T] int64: every token's row among the N * C padded rows
    segments: Segments
    num_chunks: int  # N, a multiple of g


def packed_layout(lengths: list[int], chunk_size: int, group: int, device) -> PackedLayout:
    """The layout of sequences of the given lengths (host ints: building it needs no device sync)."""
    per_group = chunk_size * group
    chunks = [num_chunks(n, per_group) * group for n in lengths]
    starts = [0]
    for n in chunks:
        starts.append(starts[-1] + n)
    N = starts[-1]
    slots = torch.cat([torch.arange(n) + start * chunk_size for n, start in zip(lengths, starts)] or [torch.zeros(0)])
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(chunks, dtype=torch.long))
    first, last = torch.zeros(N, dtype=torch.bool), torch.zeros(N, dtype=torch.bool)
    empty = torch.tensor([n == 0 for n in chunks])
    first_chunk = torch.tensor([0 if n == 0 else s for n, s in zip(chunks, starts)])
    last_chunk = torch.tensor([0 if n == 0 else s + n - 1 for n, s in zip(chunks, starts)])
    first[first_chunk[~empty]] = True
    last[last_chunk[~empty]] = True
    token_starts, T = [0, *itertools.accumulate(lengths)][:-1], sum(lengths)
    rows = torch.tensor([[min(t0 + j * chunk_size, T), max(0, min(chunk_size, n - j * chunk_size))]
                         for n, t0, c in zip(lengths, token_starts, chunks) for j in range(c)],
                        dtype=torch.long).view(N, 2)
    grouped = (seq.view(-1, group), first.view(-1, group), last.view(-1, group))
    segments = Segments(*(t.to(device) for t in (*grouped, first_chunk, last_chunk, empty, rows)))
    return PackedLayout(slots.long().to(device), segments, N)


def to_chunks_packed(x: torch.Tensor, layout: PackedLayout, chunk_size: int, dtype: torch.dtype, group: int):
    """[1, T, H, *D] of packed sequences -> [1, H, N/g, g, C, *D] in `dtype`, zero-padded."""
    H, rest = x.shape[2], x.shape[3:]
    out = x.new_zeros(1, H, layout.num_chunks * chunk_size, *rest, dtype=dtype)
    out[:, :, layout.slots] = x.transpose(1, 2).to(dtype)
    return out.view(1, H, layout.num_chunks // group, group, chunk_size, *rest)


def from_chunks_packed(x: torch.Tensor, layout: PackedLayout, dtype: torch.dtype) -> torch.Tensor:
    """[1, H, N, C, *D] -> [1, T, H, *D] in `dtype`, dropping the padded rows."""
    rows = x.reshape(1, x.shape[1], -1, *x.shape[4:])
    return rows[:, :, layout.slots].transpose(1, 2).to(dtype).contiguous()
