"""Every input gradient of a chunk, one program per chunk, in parallel after the reverse state pass:
dq, dk, dv, dbeta written once, in the caller's layout and dtypes, no partial sums left to PyTorch.

With h, dh the chunk's start state and the gradient of its end state, V_new, dV_new (float32) from
the passes, Tb = T diag(beta) and P = tril(Q K^T):
    dW  = -dV_new h^T                                     (the WY factor's gradient, rounded)
    dP  = scale tril(dO V_new^T)
    dTb = dW K^T + dV_new V^T;   dv = Tb^T dV_new
    dA  = tril(-T^T (dTb diag(beta)) T^T, -1);  dbeta = colsum(dTb * T) + rowsum(dA * K K^T)
    dq  = scale dO h^T + dP K
    dk  = dP^T Q + V_new dh^T + Tb^T dW + (diag(beta) dA + (diag(beta) dA)^T) K
(the last two: through W = Tb K and A = tril(diag(beta) K K^T, -1)). Products split their float32
operand where the float64 oracle showed rounding it costs accuracy (dV_new in dTb and dv, V_new in
dP, dP in dq), and round it elsewhere (docs/design-fused.md).

Grid: (chunks, B*H). Blocks: [C, C] tiles for T, dTb, dP, dA; head dims in BK / BV blocks, dW
formed twice (for dTb, then for dk) rather than kept.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..kernels.common import as_f32, load_tile, to_low
from .tiles import cast_for, chunk_of, dot_fine, dot_round, dot_split, load_block, load_column, load_t, store_block


@triton.jit
def grads_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, do_ptr, t_ptr, h_ptr, dh_ptr, v_new_ptr, dv_new_ptr,
                 dq_ptr, dk_ptr, dv_ptr, dbeta_ptr, chunks_ptr, scale, T, NT,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, LOW: tl.constexpr, PACKED: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    t0, n_rows, c = chunk_of(i_t, i_bh // H, T, NT, chunks_ptr, C, PACKED)
    i_h = i_bh % H
    row0 = t0 * H + i_h
    h_c, dh_c = h_ptr + (c * H + i_h) * K * V, dh_ptr + (c * H + i_h) * K * V
    q_c, k_c, v_c, do_c = q_ptr + row0 * K, k_ptr + row0 * K, v_ptr + row0 * V, do_ptr + row0 * V
    vn_c, dvn_c = v_new_ptr + row0 * V, dv_new_ptr + row0 * V
    scale = as_f32(scale)
    rc = tl.arange(0, C)
    beta = load_column(beta_ptr + row0, H, n_rows, C)
    t = load_block(t_ptr + row0 * C, H * C, n_rows, 0, C, C, C)
    tb = t * beta[None, :]
    NK: tl.constexpr = (K + BK - 1) // BK
    NV: tl.constexpr = (V + BV - 1) // BV

    # dTb's share through W: dW K^T, dW = -dV_new h^T over value blocks
    dtb = tl.zeros([C, C], tl.float32)
    for j in range(0, NK):
        dw = tl.zeros([C, BK], tl.float32)
        for iv in range(0, NV):
            dvn = load_block(dvn_c, H * V, n_rows, iv * BV, V, C, BV)
            dw = dot_round(dvn, tl.trans(load_tile(h_c, j, iv, K, V, BK, BV)), dw, False, True, LOW)
        dtb = dot_round(-dw, load_t(k_c, H * K, n_rows, j * BK, K, C, BK), dtb, False, True, LOW)
    # value blocks: dP, dTb's share through U, and dv
    dp = tl.zeros([C, C], tl.float32)
    tbt_hi = to_low(tl.trans(tb), LOW)  # Tb^T split once
    tbt_lo = to_low(tl.trans(tb) - tbt_hi.to(tl.float32), LOW)
    for iv in range(0, NV):
        vn = load_block(vn_c, H * V, n_rows, iv * BV, V, C, BV)
        dp = dot_split(load_block(do_c, H * V, n_rows, iv * BV, V, C, BV), tl.trans(vn), dp, True, False, LOW)
        dvn = load_block(dvn_c, H * V, n_rows, iv * BV, V, C, BV)
        dtb = dot_split(dvn, load_t(v_c, H * V, n_rows, iv * BV, V, C, BV), dtb, False, True, LOW)
        dv = dot_split(tbt_hi, dvn, tl.zeros([C, BV], tl.float32), True, False, LOW)
        if LOW != 0:
            dv = dot_round(tbt_lo, dvn, dv, True, False, LOW)
        store_block(dv_ptr + row0 * V, dv, H * V, n_rows, iv * BV, V, C, BV)
    dp = scale * tl.where(rc[:, None] >= rc[None, :], dp, 0.0)
    # through T = (I + A)^-1
    dbeta = tl.sum(dtb * t, 0)
    m = dot_fine(tl.trans(t), dtb * beta[None, :], tl.zeros([C, C], tl.float32), LOW)
    da = -dot_fine(m, tl.trans(t), tl.zeros([C, C], tl.float32), LOW)
    da = tl.where(rc[:, None] > rc[None, :], da, 0.0)
    # the key loop's float32 operands rounded (split for dP in dq) once, transposes taken once
    dp_hi = to_low(dp, LOW)
    dp_lo = to_low(dp - dp_hi.to(tl.float32), LOW)
    dpt = tl.trans(dp_hi)
    dab = to_low(da * beta[:, None], LOW)
    dabt = tl.trans(dab)
    # key blocks: dq, dk
    kkt = tl.zeros([C, C], tl.float32)
    for j in range(0, NK):
        k = load_block(k_c, H * K, n_rows, j * BK, K, C, BK)
        kkt = dot_round(k, tl.trans(k), kkt, True, True, LOW)
        dq_state = tl.zeros([C, BK], tl.float32)
        dk = tl.zeros([C, BK], tl.float32)
        dw = tl.zeros([C, BK], tl.float32)
        for iv in range(0, NV):
            do = load_block(do_c, H * V, n_rows, iv * BV, V, C, BV)
            h_t = tl.trans(load_tile(h_c, j, iv, K, V, BK, BV))
            dq_state = dot_round(do, h_t, dq_state, True, True, LOW)
            dw = dot_round(load_block(dvn_c, H * V, n_rows, iv * BV, V, C, BV), h_t, dw, False, True, LOW)
            dk = dot_round(load_block(vn_c, H * V, n_rows, iv * BV, V, C, BV),
                           tl.trans(load_tile(dh_c, j, iv, K, V, BK, BV)), dk, False, True, LOW)
        dq = dot_round(dp_hi, k, scale * dq_state, True, True, LOW)
        if LOW != 0:
            dq = dot_round(dp_lo, k, dq, True, True, LOW)
        store_block(dq_ptr + row0 * K, dq, H * K, n_rows, j * BK, K, C, BK)
        dk = dot_round(dpt, load_block(q_c, H * K, n_rows, j * BK, K, C, BK), dk, True, True, LOW)
        dk = dot_round(tbt_hi, -dw, dk, True, False, LOW)
        dk = dot_round(dab, k, dk, True, True, LOW)
        dk = dot_round(dabt, k, dk, True, True, LOW)
        store_block(dk_ptr + row0 * K, dk, H * K, n_rows, j * BK, K, C, BK)
    dbeta += tl.sum(da * kkt, 1)
    tl.store(dbeta_ptr + row0 + rc * H, cast_for(dbeta, dbeta_ptr), mask=rc < n_rows)
