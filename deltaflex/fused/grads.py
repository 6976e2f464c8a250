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
`qk_grads_kernel` (one program per chunk and block of BK keys) takes the output and state terms: dq,
and dk's last two terms as a float32 partial; then `wy_grads_kernel` (one program per chunk) the WY
and inverse terms: dv, dbeta, and dk, the partial plus its first two terms; dW stays in registers,
in the input dtype, from its first term to dk's, so the partial is read once. (In this order the
passes' V_new and dh are freed before the second launch, which needs neither.) Products split their
float32 operand where the float64 oracle showed rounding it costs accuracy (dV_new in dTb and dv, V_new in dP, dP in dq), and round it
elsewhere (docs/design-fused.md).

Grid: (chunks, B*H) and (cdiv(K, BK), chunks, B*H). Blocks: [C, C] tiles for T, dTb, dP, dA; head
dims in BK / BV blocks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..kernels.common import as_f32, cast_for, load_column, load_rows, load_tile, store_rows, to_low
from .tiles import chunk_of, dot_fine, dot_round, dot_split, load_rows_t


@triton.jit
def _dw_block(j: tl.constexpr, dtb, dvn_c, h_c, k_c, n_rows, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
              C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOW: tl.constexpr):
    """(Key block j of dW = -dV_new h^T, rounded; dTb + dW_j K_j^T). Blocks past K: (zeros, dTb)."""
    if j * BK < K:
        dw = tl.zeros([C, BK], tl.float32)
        for iv in range(0, tl.cdiv(V, BV)):
            dvn = load_rows(dvn_c, H * V, n_rows, 0, iv, V, C, BV)
            dw = dot_round(dvn, tl.trans(load_tile(h_c, j, iv, K, V, BK, BV)), dw, False, True, LOW)
        dw = to_low(-dw, LOW)
        dtb = dot_round(dw, load_rows_t(k_c, H * K, n_rows, 0, j, K, C, BK), dtb, True, True, LOW)
    else:
        dw = to_low(tl.zeros([C, BK], tl.float32), LOW)
    return dw, dtb


@triton.jit
def _dk_block(j: tl.constexpr, kkt, dw, tbt, dab, k_c, part_c, dk_c, n_rows, H: tl.constexpr, K: tl.constexpr,
              C: tl.constexpr, BK: tl.constexpr, LOW: tl.constexpr):
    """Stores key block j of dk = the partial + Tb^T dW + (dAb + dAb^T) K; returns kkt + K_j K_j^T."""
    if j * BK < K:
        k = load_rows(k_c, H * K, n_rows, 0, j, K, C, BK)
        kkt = dot_round(k, tl.trans(k), kkt, True, True, LOW)
        dk = dot_round(tbt, dw, load_rows(part_c, H * K, n_rows, 0, j, K, C, BK), True, True, LOW)
        dk = dot_round(tl.trans(dab), k, dot_round(dab, k, dk, True, True, LOW), True, True, LOW)
        store_rows(dk_c, dk, H * K, n_rows, 0, j, K, C, BK)
    return kkt


@triton.jit
def wy_grads_kernel(k_ptr, v_ptr, beta_ptr, t_ptr, h_ptr, dv_new_ptr, dk_part_ptr, dk_ptr, dv_ptr, dbeta_ptr, chunks_ptr,
                    T, NT,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, LOW: tl.constexpr, PACKED: tl.constexpr):
    row0, n_rows, c = chunk_of(tl.program_id(0), tl.program_id(1), T, NT, chunks_ptr, H, C, PACKED)
    h_c = h_ptr + c * K * V
    k_c, v_c, dvn_c, part_c = k_ptr + row0 * K, v_ptr + row0 * V, dv_new_ptr + row0 * V, dk_part_ptr + row0 * K
    rc = tl.arange(0, C)
    beta = load_column(beta_ptr + row0, H, n_rows, C)
    t = load_rows(t_ptr + row0 * C, H * C, n_rows, 0, 0, C, C, C)
    tb = t * beta[None, :]
    tbt = to_low(tl.trans(tb), LOW)  # Tb^T rounded (dv and dk's WY term)
    # through W: dW = -dV_new h^T by key block (K <= 4 BK), kept for dk; dTb = dW K^T
    dtb = tl.zeros([C, C], tl.float32)
    dw0, dtb = _dw_block(0, dtb, dvn_c, h_c, k_c, n_rows, H, K, V, C, BK, BV, LOW)
    dw1, dtb = _dw_block(1, dtb, dvn_c, h_c, k_c, n_rows, H, K, V, C, BK, BV, LOW)
    dw2, dtb = _dw_block(2, dtb, dvn_c, h_c, k_c, n_rows, H, K, V, C, BK, BV, LOW)
    dw3, dtb = _dw_block(3, dtb, dvn_c, h_c, k_c, n_rows, H, K, V, C, BK, BV, LOW)
    # through U: dTb += dV_new V^T, dv = Tb^T dV_new
    for iv in range(0, tl.cdiv(V, BV)):
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
    kkt = tl.zeros([C, C], tl.float32)
    dk_c = dk_ptr + row0 * K
    kkt = _dk_block(0, kkt, dw0, tbt, dab, k_c, part_c, dk_c, n_rows, H, K, C, BK, LOW)
    kkt = _dk_block(1, kkt, dw1, tbt, dab, k_c, part_c, dk_c, n_rows, H, K, C, BK, LOW)
    kkt = _dk_block(2, kkt, dw2, tbt, dab, k_c, part_c, dk_c, n_rows, H, K, C, BK, LOW)
    kkt = _dk_block(3, kkt, dw3, tbt, dab, k_c, part_c, dk_c, n_rows, H, K, C, BK, LOW)
    dbeta += tl.sum(da * kkt, 1)
    tl.store(dbeta_ptr + row0 + rc * H, cast_for(dbeta, dbeta_ptr), mask=rc < n_rows)


@triton.jit
def qk_grads_kernel(q_ptr, k_ptr, do_ptr, h_ptr, dh_ptr, v_new_ptr, dq_ptr, dk_part_ptr, chunks_ptr, scale,
                    T, NT, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, LOW: tl.constexpr, PACKED: tl.constexpr):
    j = tl.program_id(0)
    row0, n_rows, c = chunk_of(tl.program_id(1), tl.program_id(2), T, NT, chunks_ptr, H, C, PACKED)
    h_c, dh_c = h_ptr + c * K * V, dh_ptr + c * K * V
    do_c, vn_c = do_ptr + row0 * V, v_new_ptr + row0 * V
    scale = as_f32(scale)
    rc = tl.arange(0, C)
    NV: tl.constexpr = (V + BV - 1) // BV
    dp = tl.zeros([C, C], tl.float32)
    dq = tl.zeros([C, BK], tl.float32)
    dk = tl.zeros([C, BK], tl.float32)
    for iv in range(0, NV):
        do = load_rows(do_c, H * V, n_rows, 0, iv, V, C, BV)
        vn = load_rows(vn_c, H * V, n_rows, 0, iv, V, C, BV)
        dp = dot_split(do, tl.trans(vn), dp, True, False, LOW)
        dq = dot_round(do, tl.trans(load_tile(h_c, j, iv, K, V, BK, BV)), dq, True, True, LOW)
        dk = dot_round(vn, tl.trans(load_tile(dh_c, j, iv, K, V, BK, BV)), dk, False, True, LOW)
    dp = scale * tl.where(rc[:, None] >= rc[None, :], dp, 0.0)
    k = load_rows(k_ptr + row0 * K, H * K, n_rows, 0, j, K, C, BK)
    dq = dot_split(dp, k, scale * dq, False, True, LOW)
    store_rows(dq_ptr + row0 * K, dq, H * K, n_rows, 0, j, K, C, BK)
    dk = dot_round(tl.trans(dp), load_rows(q_ptr + row0 * K, H * K, n_rows, 0, j, K, C, BK), dk, False, True, LOW)
    store_rows(dk_part_ptr + row0 * K, dk, H * K, n_rows, 0, j, K, C, BK)
