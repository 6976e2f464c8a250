"""The chunk outputs, one program per chunk, in parallel: O = scale (Q h + tril(Q K^T) V_new),
written once, in the caller's layout and dtype.

h (the chunk's start state, input dtype) and Q are exact operands; the scores P = tril(Q K^T) and
V_new (float32) are split into hi + lo: their product telescopes on correlated keys, where rounding
either one costs several times the output's own rounding error (docs/design-fused.md).
FROM_T: V_new is not read but recomputed, as the state pass computed it (state.py), from T, beta, V
and h: V_new = T diag(beta) (V - K h), so O = scale (Q h + M (V - K h)) with M = P T diag(beta)
formed once a chunk (both split); the state pass then writes no V_new (B T H V float32 values).
Grid: (chunks, B*H). Blocks: P is one [C, C] tile; the value dim in BV blocks, the key dim in BK.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..kernels.common import as_f32, load_rows, load_tile, store_rows
from .state import t_beta
from .tiles import chunk_of, dot_fine, dot_round, dot_split, load_rows_t


@triton.jit
def output_kernel(q_ptr, k_ptr, v_ptr, t_ptr, beta_ptr, v_new_ptr, h_ptr, o_ptr, chunks_ptr, scale, T, NT,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, LOW: tl.constexpr, PACKED: tl.constexpr, FROM_T: tl.constexpr):
    row0, n_rows, c = chunk_of(tl.program_id(0), tl.program_id(1), T, NT, chunks_ptr, H, C, PACKED)
    h_c = h_ptr + c * K * V
    scale = as_f32(scale)
    rc = tl.arange(0, C)
    p = tl.zeros([C, C], tl.float32)
    for j in range(0, tl.cdiv(K, BK)):
        q = load_rows(q_ptr + row0 * K, H * K, n_rows, 0, j, K, C, BK)
        p = dot_round(q, load_rows_t(k_ptr + row0 * K, H * K, n_rows, 0, j, K, C, BK), p, True, True, LOW)
    p = tl.where(rc[:, None] >= rc[None, :], p, 0.0)
    if FROM_T:
        m = dot_fine(p, t_beta(t_ptr, beta_ptr, row0, n_rows, H, C), tl.zeros([C, C], tl.float32), LOW)
    for iv in range(0, tl.cdiv(V, BV)):
        o = tl.zeros([C, BV], tl.float32)
        kh = tl.zeros([C, BV], tl.float32)
        for j in range(0, tl.cdiv(K, BK)):
            q = load_rows(q_ptr + row0 * K, H * K, n_rows, 0, j, K, C, BK)
            h = load_tile(h_c, j, iv, K, V, BK, BV)
            o = dot_round(q, h, o, True, True, LOW)
            if FROM_T:
                kh = dot_round(load_rows(k_ptr + row0 * K, H * K, n_rows, 0, j, K, C, BK), h, kh, True, True, LOW)
        if FROM_T:
            x = load_rows(v_ptr + row0 * V, H * V, n_rows, 0, iv, V, C, BV).to(tl.float32) - kh
            o = scale * dot_fine(m, x, o, LOW)
        else:
            v_new = load_rows(v_new_ptr + row0 * V, H * V, n_rows, 0, iv, V, C, BV)
            o = scale * dot_split(p, v_new, o, False, False, LOW)
        store_rows(o_ptr + row0 * V, o, H * V, n_rows, 0, iv, V, C, BV)
