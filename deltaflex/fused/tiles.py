"""Where a chunk's rows are, and the tile loads, stores and products the fused kernels share.

Every token-indexed tensor, inputs and intermediates alike, is token-major as the caller holds q:
[B, T, H, D] (packed sequences: B = 1), so token g of the flattened B*T and head h start at
(g H + h) D: row g H + h, rows of one head H D apart. Chunk-indexed tensors (the chunk states h and dh) are
[total chunks, H, K, V]. `chunk_of` and `sequence_of` turn a program's indices into those places;
without packed sequences they are arithmetic, with them they read the host-built tables of
`chunk.Packing`. A chunk's blocks load and store with kernels.common's load_rows / store_rows.

Products (the precision scheme, docs/design-fused.md): tiles already in the input dtype LOW enter
the tensor cores as they are; a float32 operand is either rounded to LOW (`dot_round`) or split into
hi + lo (`dot_split`, two or three products), where the float64 oracle showed rounding it costs
accuracy. With float32 inputs (LOW = 0) every product runs as 3xTF32, and with fp16 inputs too (a
value rounded to fp16 stays rounded, then enters exactly): on the H200 Triton 3.6's fp16 tensor-core
builds gave non-finite inverses and wrong dk, dbeta (bf16's, the same kernels, are right), while
3xTF32 is right there for float32; fp16 then runs at float32's speed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..kernels.common import mma, to_low


@triton.jit
def chunk_of(i_t, i_bh, T, NT, chunks_ptr, H: tl.constexpr, C: tl.constexpr, PACKED: tl.constexpr):
    """Where chunk i_t of batch-and-head i_bh is: (its first row among the [B*T*H] rows of every
    token-major tensor, its row count, its row among the [chunks*H] of the chunk-indexed ones).
    Packed sequences: chunk i_t of all (B = 1), from the [total chunks, 2] table of (first token, rows)."""
    i_h = i_bh % H
    if PACKED:
        t0 = tl.load(chunks_ptr + 2 * i_t).to(tl.int64)
        rows = tl.load(chunks_ptr + 2 * i_t + 1).to(tl.int64)
        c = i_t.to(tl.int64)
    else:
        i_b = (i_bh // H).to(tl.int64)
        t0, rows, c = i_b * T + i_t * C, tl.minimum(T - i_t * C, C).to(tl.int64), i_b * NT + i_t
    return t0 * H + i_h, rows, c * H + i_h


@triton.jit
def sequence_of(i_n, T, NT, seqs_ptr, PACKED: tl.constexpr):
    """(first token, first global chunk, chunks, tokens) of sequence i_n; packed sequences: from the
    [sequences, 4] table."""
    if PACKED:
        base = seqs_ptr + 4 * i_n
        return (tl.load(base).to(tl.int64), tl.load(base + 1).to(tl.int64), tl.load(base + 2).to(tl.int32),
                tl.load(base + 3).to(tl.int64))
    else:
        i_n = i_n.to(tl.int64)
        return i_n * T, i_n * NT, NT, i_n * 0 + T  # (T may arrive as a constexpr: Triton specialises 1)


@triton.jit
def load_rows_t(ptr, stride, rows, i, j, COLS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """The transpose [BC, BR] of kernels.common.load_rows's block (i, j), loaded transposed."""
    r = i * BR + tl.arange(0, BR)
    c = j * BC + tl.arange(0, BC)
    return tl.load(ptr + r[None, :] * stride + c[:, None], mask=(r < rows)[None, :] & (c < COLS)[:, None], other=0.0)


@triton.jit
def dot_round(a, b, acc, A_EXACT: tl.constexpr, B_EXACT: tl.constexpr, LOW: tl.constexpr):
    """acc + a @ b, a float32 operand rounded to LOW (one product); float32 and fp16 inputs: 3xTF32."""
    if LOW == 1:
        return mma(a, b, acc, A_EXACT, B_EXACT, 2, LOW)
    else:
        return mma(a, b, acc, A_EXACT, B_EXACT, 0, LOW)


@triton.jit
def dot_split(a, b, acc, A_EXACT: tl.constexpr, B_EXACT: tl.constexpr, LOW: tl.constexpr):
    """acc + a @ b, a float32 operand split into hi + lo in LOW (near float32 accuracy); float32 and
    fp16 inputs: 3xTF32."""
    if LOW == 1:
        return mma(a, b, acc, A_EXACT, B_EXACT, 1, LOW)
    else:
        return mma(a, b, acc, A_EXACT, B_EXACT, 0, LOW)


@triton.jit
def dot_fine(a, b, acc, LOW: tl.constexpr):
    """acc + a @ b of two float32 tiles, both split (the inverse's algebra: about 1e-5 relative error
    on correlated keys, far under bf16's); float32 inputs: 3xTF32 (2e-7, but twice the registers)."""
    return dot_split(a, b, acc, False, False, LOW)


@triton.jit
def hi_lo(x, LOW: tl.constexpr):
    """A float32 tile as hi + lo in the input dtype LOW (lo the rounding error of hi; zero for float32)."""
    hi = to_low(x, LOW)
    return hi, to_low(x - hi.to(tl.float32), LOW)


def launch_dims(K: int) -> int:
    """The key of the launch tables (chunk.py's, segments.py's) for key head dim K: 64, 128 or 256."""
    return next(d for d in (64, 128, 256) if K <= d)


def block(d: int, at_most: int = 64) -> int:
    """A power-of-two block for a dim of d: at least 16 (tl.dot's minimum), at most `at_most`."""
    return max(16, min(triton.next_power_of_2(d), at_most))
