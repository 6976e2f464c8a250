"""Per-chunk preparation: the chunk's inverse T and WY factors, one program per chunk.

Forward (`prepare_fwd_kernel`): A = tril(diag(beta) K K^T, -1) in float32 (exact products of the
input keys), T = (I + A)^-1 (`invert_unit_lower`), then W = T diag(beta) K and U = T diag(beta) V
with T diag(beta) split into hi + lo. Writes T (float32, kept for backward; not written where no
gradient is needed), W (input dtype: the state pass rounds it anyway) and U (float32: its rounding is
what correlated keys amplify).
Backward (`prepare_bwd_kernel`): the same W and U from the saved T, and the output's local value
gradient dV_local = scale tril(Q K^T)^T dO (float32), which the reverse state pass starts from.

The inverse: the C/16 diagonal 16 x 16 blocks of (I + A) by doubling (the inverses of their 2 x 2,
4 x 4, 8 x 8, then 16 x 16 diagonal blocks, on the tensor cores; on the H200 prepare_fwd took 0.31 ms
at 4 x 4096 x 16 x 128 with forward substitution's 15 dependent row steps, 0.19 with this), all at once
as a [C/16, 16, 16] tile (D, their inverses, block-diagonal); with N = D A_off (A_off: A without those
blocks, strictly block-lower, so N^(C/16) = 0), (I + A)^-1 = (I + N)^-1 D = prod_m (I + (-N)^(2^m)) D.
The powers of N stay bounded on correlated keys (D takes out the diagonal blocks' binomial growth):
its products split into bf16 hi + lo parts, about 1e-5 relative error against float64 there (float32
inputs: 3xTF32, 2e-7; docs/design-fused.md).

Grid: (chunks, B*H). Blocks: the chunk (C <= 64 rows) as one tile; BK, BV <= 64 over the head dims.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..kernels.common import as_f32, invert_unit_lower_16, load_column, load_rows, store_rows
from .tiles import chunk_of, dot_fine, dot_round, dot_split, load_rows_t


@triton.jit
def invert_unit_lower(a, C: tl.constexpr, LOW_IN: tl.constexpr):
    """(I + a)^-1 of a strictly lower [C, C] float32 tile (C in 16, 32, 64). fp16 inputs: its products
    as float32's, 3xTF32 (tiles.py: Triton 3.6's fp16 build of them gave non-finite rows on the H200).
    LOW is mapped here, not in tiles.py alone: invert_unit_lower_16, shared with the stage kernels
    (kernels/solve.py, fp16 there unchanged), picks its products from LOW itself."""
    LOW: tl.constexpr = 0 if LOW_IN == 2 else LOW_IN
    NB: tl.constexpr = C // 16
    nb = tl.arange(0, NB)
    same = nb[:, None, None, None] == nb[None, None, :, None]  # [NB, 1, NB, 1]: a diagonal block
    a4 = tl.reshape(a, [NB, 16, NB, 16])
    i16 = tl.arange(0, 16)
    x = invert_unit_lower_16(tl.sum(tl.where(same, a4, 0.0), 2), i16[None, :, None], i16[None, None, :], LOW)
    d = tl.reshape(tl.where(same, x[:, :, None, :], 0.0), [C, C])  # block-diagonal inverse D
    if NB == 1:
        return d
    rc = tl.arange(0, C)
    n = dot_fine(d, tl.where((rc[:, None] // 16) == (rc[None, :] // 16), 0.0, a), tl.zeros([C, C], tl.float32), LOW)
    inv = tl.where(rc[:, None] == rc[None, :], 1.0, 0.0) - n  # (I + N)^-1 = (I - N)(I + N^2)..., N^NB = 0
    if NB > 2:
        inv = dot_fine(inv, dot_fine(n, n, tl.zeros([C, C], tl.float32), LOW), inv, LOW)
    return dot_fine(inv, d, tl.zeros([C, C], tl.float32), LOW)


@triton.jit
def _wy_factors(tb, k_ptr, v_ptr, w_ptr, u_ptr, row0, n_rows, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOW: tl.constexpr):
    """W = Tb K and U = Tb V for the chunk at row0 (token-major), Tb = T diag(beta) [C, C] float32 split
    into hi + lo."""
    for j in range(0, tl.cdiv(K, BK)):
        k = load_rows(k_ptr + row0 * K, H * K, n_rows, 0, j, K, C, BK)
        w = dot_split(tb, k, tl.zeros([C, BK], tl.float32), False, True, LOW)
        store_rows(w_ptr + row0 * K, w, H * K, n_rows, 0, j, K, C, BK)
    for j in range(0, tl.cdiv(V, BV)):
        v = load_rows(v_ptr + row0 * V, H * V, n_rows, 0, j, V, C, BV)
        u = dot_split(tb, v, tl.zeros([C, BV], tl.float32), False, True, LOW)
        store_rows(u_ptr + row0 * V, u, H * V, n_rows, 0, j, V, C, BV)


@triton.jit
def prepare_fwd_kernel(k_ptr, v_ptr, beta_ptr, t_ptr, w_ptr, u_ptr, chunks_ptr, T, NT,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, LOW: tl.constexpr, PACKED: tl.constexpr, STORE_T: tl.constexpr):
    row0, n_rows, _ = chunk_of(tl.program_id(0), tl.program_id(1), T, NT, chunks_ptr, H, C, PACKED)
    rc = tl.arange(0, C)
    a = tl.zeros([C, C], tl.float32)
    for j in range(0, tl.cdiv(K, BK)):
        k = load_rows(k_ptr + row0 * K, H * K, n_rows, 0, j, K, C, BK)
        a = dot_round(k, tl.trans(k), a, True, True, LOW)
    beta = load_column(beta_ptr + row0, H, n_rows, C)
    t = invert_unit_lower(tl.where(rc[:, None] > rc[None, :], a * beta[:, None], 0.0), C, LOW)
    if STORE_T:  # kept for backward (not where no gradient will be asked for)
        store_rows(t_ptr + row0 * C, t, H * C, n_rows, 0, 0, C, C, C)
    _wy_factors(t * beta[None, :], k_ptr, v_ptr, w_ptr, u_ptr, row0, n_rows, H, K, V, C, BK, BV, LOW)


@triton.jit
def prepare_bwd_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, t_ptr, do_ptr, w_ptr, u_ptr, dv_ptr, chunks_ptr, scale, T, NT,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, LOW: tl.constexpr, PACKED: tl.constexpr):
    row0, n_rows, _ = chunk_of(tl.program_id(0), tl.program_id(1), T, NT, chunks_ptr, H, C, PACKED)
    scale = as_f32(scale)
    rc = tl.arange(0, C)
    beta = load_column(beta_ptr + row0, H, n_rows, C)
    t = load_rows(t_ptr + row0 * C, H * C, n_rows, 0, 0, C, C, C)
    _wy_factors(t * beta[None, :], k_ptr, v_ptr, w_ptr, u_ptr, row0, n_rows, H, K, V, C, BK, BV, LOW)
    # dV_local = scale tril(Q K^T)^T dO, i.e. scale tril(K Q^T, upper) dO
    kq = tl.zeros([C, C], tl.float32)
    for j in range(0, tl.cdiv(K, BK)):
        k = load_rows(k_ptr + row0 * K, H * K, n_rows, 0, j, K, C, BK)
        q = load_rows_t(q_ptr + row0 * K, H * K, n_rows, 0, j, K, C, BK)
        kq = dot_round(k, q, kq, True, True, LOW)
    kq = tl.where(rc[:, None] <= rc[None, :], kq, 0.0)
    for j in range(0, tl.cdiv(V, BV)):
        do = load_rows(do_ptr + row0 * V, H * V, n_rows, 0, j, V, C, BV)
        dv = scale * dot_split(kq, do, tl.zeros([C, BV], tl.float32), False, True, LOW)
        store_rows(dv_ptr + row0 * V, dv, H * V, n_rows, 0, j, V, C, BV)
