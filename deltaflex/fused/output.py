"""The chunk outputs, one program per chunk, in parallel: O = scale (Q h + tril(Q K^T) V_new),
written once, in the caller's layout and dtype.

h (the chunk's start state, input dtype) and Q are exact operands; the scores P = tril(Q K^T) and
V_new (float32) are split into hi + lo: their product telescopes on correlated keys, where rounding
either one costs several times the output's own rounding error (docs/design-fused.md).
Grid: (chunks, B*H). Blocks: P is one [C, C] tile; the value dim in BV blocks, the key dim in BK.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..kernels.common import as_f32, load_rows, load_tile, store_rows
from .tiles import chunk_of, dot_round, dot_split, load_rows_t


@triton.jit
def output_kernel(q_ptr, k_ptr, v_new_ptr, h_ptr, o_ptr, chunks_ptr, scale, T, NT,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, LOW: tl.constexpr, PACKED: tl.constexpr):
    row0, n_rows, c = chunk_of(tl.program_id(0), tl.program_id(1), T, NT, chunks_ptr, H, C, PACKED)
    h_c = h_ptr + c * K * V
    scale = as_f32(scale)
    rc = tl.arange(0, C)
    p = tl.zeros([C, C], tl.float32)
    for j in range(0, tl.cdiv(K, BK)):
        q = load_rows(q_ptr + row0 * K, H * K, n_rows, 0, j, K, C, BK)
        p = dot_round(q, load_rows_t(k_ptr + row0 * K, H * K, n_rows, 0, j, K, C, BK), p, True, True, LOW)
    p = tl.where(rc[:, None] >= rc[None, :], p, 0.0)
    for iv in range(0, tl.cdiv(V, BV)):
        o = tl.zeros([C, BV], tl.float32)
        for j in range(0, tl.cdiv(K, BK)):
            q = load_rows(q_ptr + row0 * K, H * K, n_rows, 0, j, K, C, BK)
            o = dot_round(q, load_tile(h_c, j, iv, K, V, BK, BV), o, True, True, LOW)
        v_new = load_rows(v_new_ptr + row0 * V, H * V, n_rows, 0, iv, V, C, BV)
        o = scale * dot_split(p, v_new, o, False, False, LOW)
        store_rows(o_ptr + row0 * V, o, H * V, n_rows, 0, iv, V, C, BV)
