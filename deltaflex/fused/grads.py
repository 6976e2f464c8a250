"""Every input gradient of a chunk, in parallel after the reverse state pass, in two launches:
dq, dk, dv, dbeta each written once in the caller's layout and dtype (dk from a float32 partial that
the first launch leaves and the second completes: no partial sums left to PyTorch).

With h, dh the chunk's start state and the gradient of its end state, V_new, dV_new (float32) from
the passes, Tb = T diag(beta) and P = tril(Q K^T):
    dW  = -dV_new h^T                                     (the WY factor's gradient, rounded)
    dTb = dW K^T + dV_new V^T;   dv = Tb^T dV_new
    dA  = tril(-T^T (dTb diag(beta)) T^T, -1);  dbeta = colsum(dTb * T) + rowsum(dA * K K^T)
    dP  = scale tril(dO V_new^T)
    dq  = scale dO h^T + dP K
    dk  = Tb^T dW + (diag(beta) dA + (diag(beta) dA)^T) K + dP^T Q + V_new dh^T
`qk_grads_kernel` (one program per chunk and block of BK keys) takes every term through h and dh:
dq, dW (rounded, in the input dtype, over W's buffer, which the state passes no longer need), and
dk's last two terms as a float32 partial; then `wy_grads_kernel` (one program per chunk) the WY and
inverse terms: dv, dbeta, and dk, the partial plus its first two terms. So the first launch reads each
of V_new, dV_new, h, dh once, and the second none of the passes' per-chunk states, nor dk twice.
Products split their float32 operand where the float64 oracle showed rounding it costs accuracy
(dV_new in dTb and dv, V_new in dP, dP in dq), and round it elsewhere (docs/design-fused.md).

Grid: (cdiv(K, BK), chunks, B*H) and (chunks, B*H). Blocks: [C, C] tiles for T, dTb, dP, dA; head
dims in BK / BV blocks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..kernels.common import as_f32, cast_for, load_column, load_rows, load_tile, store_rows, to_low
from .tiles import chunk_of, dot_fine, dot_round, dot_split, load_rows_t


@triton.jit
def wy_grads_kernel(k_ptr, v_ptr, beta_ptr, t_ptr, dw_ptr, dv_new_ptr, dk_part_ptr, dk_ptr, dv_ptr, dbeta_ptr, chunks_ptr,
                    T, NT,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, LOW: tl.constexpr, PACKED: tl.constexpr):
    row0, n_rows, _ = chunk_of(tl.program_id(0), tl.program_id(1), T, NT, chunks_ptr, H, C, PACKED)
    k_c, v_c, dvn_c, dw_c = k_ptr + row0 * K, v_ptr + row0 * V, dv_new_ptr + row0 * V, dw_ptr + row0 * K
    rc = tl.arange(0, C)
    beta = load_column(beta_ptr + row0, H, n_rows, C)
    t = load_rows(t_ptr + row0 * C, H * C, n_rows, 0, 0, C, C, C)
    tb = t * beta[None, :]
    tbt = to_low(tl.trans(tb), LOW)  # Tb^T rounded (dv and dk's WY term)
    NK: tl.constexpr = (K + BK - 1) // BK
    NV: tl.constexpr = (V + BV - 1) // BV
    # through W: dTb = dW K^T (dk's Tb^T dW below)
    dtb = tl.zeros([C, C], tl.float32)
    for j in range(0, NK):
        dw = load_rows(dw_c, H * K, n_rows, 0, j, K, C, BK)
        dtb = dot_round(dw, load_rows_t(k_c, H * K, n_rows, 0, j, K, C, BK), dtb, True, True, LOW)
    # through U: dTb += dV_new V^T, dv = Tb^T dV_new
    for iv in range(0, NV):
        dvn = load_rows(dvn_c, H * V, n_rows, 0, iv, V, C, BV)
        dtb = dot_split(dvn, load_rows_t(v_c, H * V, n_rows, 0, iv, V, C, BV), dtb, False, True, LOW)
        dv = dot_split(tbt, dvn, tl.zeros([C, BV], tl.float32), True, False, LOW)
        store_rows(dv_ptr + row0 * V, dv, H * V, n_rows, 0, iv, V, C, BV)
    # through T = (I + A)^-1 and A = tril(diag(beta) K K^T, -1)
    dbeta = tl.sum(dtb * t, 0)
    m = dot_fine(tl.trans(t), dtb * beta[None, :], tl.zeros([C, C], tl.float32), LOW)
    da = -dot_fine(m, tl.trans(t), tl.zeros([C, C], tl.float32), LOW)
    da = tl.where(rc[:, None] > rc[None, :], da, 0.0)
    dab = to_low(da * beta[:, None], LOW)
    dabt = tl.trans(dab)
    kkt = tl.zeros([C, C], tl.float32)
    for j in range(0, NK):
        k = load_rows(k_c, H * K, n_rows, 0, j, K, C, BK)
        kkt = dot_round(k, tl.trans(k), kkt, True, True, LOW)
        dk = dot_round(tbt, load_rows(dw_c, H * K, n_rows, 0, j, K, C, BK),
                       load_rows(dk_part_ptr + row0 * K, H * K, n_rows, 0, j, K, C, BK), True, True, LOW)
        dk = dot_round(dabt, k, dot_round(dab, k, dk, True, True, LOW), True, True, LOW)
        store_rows(dk_ptr + row0 * K, dk, H * K, n_rows, 0, j, K, C, BK)
    dbeta += tl.sum(da * kkt, 1)
    tl.store(dbeta_ptr + row0 + rc * H, cast_for(dbeta, dbeta_ptr), mask=rc < n_rows)


@triton.jit
def qk_grads_kernel(q_ptr, k_ptr, do_ptr, h_ptr, dh_ptr, v_new_ptr, dv_new_ptr, dq_ptr, dw_ptr, dk_part_ptr, chunks_ptr,
                    scale, T, NT, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, LOW: tl.constexpr, PACKED: tl.constexpr):
    j = tl.program_id(0)
    row0, n_rows, c = chunk_of(tl.program_id(1), tl.program_id(2), T, NT, chunks_ptr, H, C, PACKED)
    h_c, dh_c = h_ptr + c * K * V, dh_ptr + c * K * V
    do_c, vn_c, dvn_c = do_ptr + row0 * V, v_new_ptr + row0 * V, dv_new_ptr + row0 * V
    scale = as_f32(scale)
    rc = tl.arange(0, C)
    NV: tl.constexpr = (V + BV - 1) // BV
    dp = tl.zeros([C, C], tl.float32)
    dq = tl.zeros([C, BK], tl.float32)
    dw = tl.zeros([C, BK], tl.float32)
    dk = tl.zeros([C, BK], tl.float32)
    for iv in range(0, NV):
        do = load_rows(do_c, H * V, n_rows, 0, iv, V, C, BV)
        vn = load_rows(vn_c, H * V, n_rows, 0, iv, V, C, BV)
        h_t = tl.trans(load_tile(h_c, j, iv, K, V, BK, BV))
        dp = dot_split(do, tl.trans(vn), dp, True, False, LOW)
        dq = dot_round(do, h_t, dq, True, True, LOW)
        dw = dot_round(load_rows(dvn_c, H * V, n_rows, 0, iv, V, C, BV), h_t, dw, False, True, LOW)
        dk = dot_round(vn, tl.trans(load_tile(dh_c, j, iv, K, V, BK, BV)), dk, False, True, LOW)
    store_rows(dw_ptr + row0 * K, -dw, H * K, n_rows, 0, j, K, C, BK)  # dW = -dV_new h^T
    dp = scale * tl.where(rc[:, None] >= rc[None, :], dp, 0.0)
    k = load_rows(k_ptr + row0 * K, H * K, n_rows, 0, j, K, C, BK)
    dq = dot_split(dp, k, scale * dq, False, True, LOW)
    store_rows(dq_ptr + row0 * K, dq, H * K, n_rows, 0, j, K, C, BK)
    dk = dot_round(tl.trans(dp), load_rows(q_ptr + row0 * K, H * K, n_rows, 0, j, K, C, BK), dk, False, True, LOW)
    store_rows(dk_part_ptr + row0 * K, dk, H * K, n_rows, 0, j, K, C, BK)
