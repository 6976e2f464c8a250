"""The sequential passes over chunks, one program per (sequence, head, block of BV value columns),
the state in float32 registers as up to four [BK, BV] tiles (K <= 256, BK <= 64).

Forward (`state_fwd_kernel`), chunk by chunk:
    h[n] = S (input dtype);  V_new = U - W S;  S <- S + K^T V_new,
S rounded to the input dtype as an operand (as fla does: the oracle shows little lost there), V_new
split into hi + lo for the update where SPLIT (else rounded: one product less a step, but on
correlated keys the final state's error grows from 5e-4 to 6e-3), V_new stored in float32 over U
(a program reads its slice of U before it writes V_new there, and no other program touches it).
With OUTPUT (the forward's pass) it writes the output instead of h and V_new:
    O = scale (Q h[n] + tril(Q K^T) V_new),
output.py's products on the state in registers (each value block's program computes the scores
again), so neither h (B T/C H K V values) nor V_new goes through memory; backward's pass, which
the gradients need h and V_new of, runs without it.
Backward (`state_bwd_kernel`), chunks in reverse, dS the gradient of the state after the chunk:
    dh[n] = dS (input dtype);  dV_new = dV_local + K dS;  dS <- dS + scale Q^T dO - W^T dV_new,
dV_new stored in float32 over dV_local. It carries dS' = dS / scale (dV_new' = dV_new / scale likewise),
so that both products of the update accumulate into the state's tiles: dS' <- dS' + Q^T dO + W^T (-dV_new'),
the same roundings (dV_new' rounded as an operand) and no temporaries (at head dim 256 they spilled).

Packed sequences: one program per sequence walks its own chunks (`tiles.sequence_of`); an empty
sequence passes its initial state (its final-state gradient) straight through.
Grid: (cdiv(V, BV), sequences * H).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..kernels.common import as_f32, load_rows, load_state, store_rows, store_state, to_low
from .tiles import dot_round, dot_split, hi_lo, load_rows_t, sequence_of


@triton.jit
def _tile_times(acc, a_c, stride, n_rows, s, i: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                LOW: tl.constexpr, SPLIT_S: tl.constexpr):
    if i * BK < K:
        a = load_rows(a_c, stride, n_rows, 0, i, K, C, BK)
        if SPLIT_S:
            acc = dot_split(a, s, acc, True, False, LOW)
        else:
            acc = dot_round(a, s, acc, True, False, LOW)
    return acc


@triton.jit
def rows_times(acc, a_c, stride, n_rows, s0, s1, s2, s3, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
               LOW: tl.constexpr, SPLIT_S: tl.constexpr):
    """acc + A S for a chunk's rows A [C, K] at a_c (input dtype) and a float32 state S in tiles, S
    split into hi + lo where SPLIT_S (segments.py's transitions), else rounded (the passes here)."""
    acc = _tile_times(acc, a_c, stride, n_rows, s0, 0, K, C, BK, LOW, SPLIT_S)
    acc = _tile_times(acc, a_c, stride, n_rows, s1, 1, K, C, BK, LOW, SPLIT_S)
    acc = _tile_times(acc, a_c, stride, n_rows, s2, 2, K, C, BK, LOW, SPLIT_S)
    acc = _tile_times(acc, a_c, stride, n_rows, s3, 3, K, C, BK, LOW, SPLIT_S)
    return acc


@triton.jit
def _plus_at_t(s, a_t, x_hi, x_lo, LOW: tl.constexpr, SPLIT: tl.constexpr):
    """S + A^T X for a loaded A^T [BK, C] and X = x_hi (+ x_lo where SPLIT), [C, BV] in the input dtype."""
    s = dot_round(a_t, x_hi, s, True, True, LOW)
    if SPLIT and LOW != 0:  # float32 inputs have no lo part
        s = dot_round(a_t, x_lo, s, True, True, LOW)
    return s


@triton.jit
def plus_at_x(s, i: tl.constexpr, a_c, stride, n_rows, x_hi, x_lo, K: tl.constexpr, C: tl.constexpr,
               BK: tl.constexpr, LOW: tl.constexpr, SPLIT: tl.constexpr):
    """Tile i of S + A^T X for a chunk's rows A [C, K] at a_c and X = x_hi (+ x_lo where SPLIT), [C, BV]
    in the input dtype."""
    if i * BK < K:
        s = _plus_at_t(s, load_rows_t(a_c, stride, n_rows, 0, i, K, C, BK), x_hi, x_lo, LOW, SPLIT)
    return s


@triton.jit
def plus_kt_x(s0, s1, s2, s3, k_c, stride, n_rows, x, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
              LOW: tl.constexpr, SPLIT: tl.constexpr):
    """The state tiles of S + K^T X for a chunk's rows K [C, K] at k_c and X [C, BV] float32, X rounded
    to the input dtype, or split into hi + lo where SPLIT."""
    x_hi, x_lo = hi_lo(x, LOW)
    s0 = plus_at_x(s0, 0, k_c, stride, n_rows, x_hi, x_lo, K, C, BK, LOW, SPLIT)
    s1 = plus_at_x(s1, 1, k_c, stride, n_rows, x_hi, x_lo, K, C, BK, LOW, SPLIT)
    s2 = plus_at_x(s2, 2, k_c, stride, n_rows, x_hi, x_lo, K, C, BK, LOW, SPLIT)
    s3 = plus_at_x(s3, 3, k_c, stride, n_rows, x_hi, x_lo, K, C, BK, LOW, SPLIT)
    return s0, s1, s2, s3


@triton.jit
def _out_products(ws, qs, p, i: tl.constexpr, w_c, q_c, k_c, stride, n_rows, s, K: tl.constexpr, C: tl.constexpr,
                  BK: tl.constexpr, LOW: tl.constexpr):
    """Key block i's part of the step's three products when the pass writes the output: W S and Q S
    (state tile i rounded, as h is stored) and the scores Q K^T (exact operands); and the block's K^T,
    which the update may take again (REUSE_KT)."""
    if i * BK < K:
        q = load_rows(q_c, stride, n_rows, 0, i, K, C, BK)
        k_t = load_rows_t(k_c, stride, n_rows, 0, i, K, C, BK)
        ws = dot_round(load_rows(w_c, stride, n_rows, 0, i, K, C, BK), s, ws, True, False, LOW)
        qs = dot_round(q, s, qs, True, False, LOW)
        p = dot_round(q, k_t, p, True, True, LOW)
    else:
        k_t = tl.zeros([BK, C], tl.float32).to(k_c.dtype.element_ty)
    return ws, qs, p, k_t


@triton.jit
def _plus_kt_tile(s, i: tl.constexpr, k_t, x_hi, x_lo, K: tl.constexpr, BK: tl.constexpr, LOW: tl.constexpr,
                  SPLIT: tl.constexpr):
    """Tile i of S + K^T X, as plus_at_x, from the block's K^T already loaded."""
    if i * BK < K:
        s = _plus_at_t(s, k_t, x_hi, x_lo, LOW, SPLIT)
    return s


@triton.jit
def state_fwd_kernel(q_ptr, k_ptr, w_ptr, u_ptr, h_ptr, o_ptr, s0_ptr, final_ptr, seqs_ptr, scale, T, NT,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, LOW: tl.constexpr, PACKED: tl.constexpr, HAS_S0: tl.constexpr,
                     HAS_FINAL: tl.constexpr, SPLIT: tl.constexpr, OUTPUT: tl.constexpr, REUSE_KT: tl.constexpr):
    iv, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, c0, nt, length = sequence_of(i_n, T, NT, seqs_ptr, PACKED)
    if HAS_S0:
        s0, s1, s2, s3 = load_state(s0_ptr + i_nh.to(tl.int64) * K * V, iv, K, V, BK, BV)
    else:
        s0 = tl.zeros([BK, BV], tl.float32)
        s1, s2, s3 = s0, s0, s0
    if OUTPUT:
        scale = as_f32(scale)
        rc = tl.arange(0, C)
    for i in range(nt):
        row0 = (bos + i * C) * H + i_h
        n_rows = tl.minimum(length - i * C, C)
        if OUTPUT:  # O = scale (Q h + tril(Q K^T) V_new), as output.py's kernel, from the state in registers
            w_c, q_c, k_c = w_ptr + row0 * K, q_ptr + row0 * K, k_ptr + row0 * K
            ws = tl.zeros([C, BV], tl.float32)
            qs, p = ws, tl.zeros([C, C], tl.float32)
            ws, qs, p, k0 = _out_products(ws, qs, p, 0, w_c, q_c, k_c, H * K, n_rows, s0, K, C, BK, LOW)
            ws, qs, p, k1 = _out_products(ws, qs, p, 1, w_c, q_c, k_c, H * K, n_rows, s1, K, C, BK, LOW)
            ws, qs, p, k2 = _out_products(ws, qs, p, 2, w_c, q_c, k_c, H * K, n_rows, s2, K, C, BK, LOW)
            ws, qs, p, k3 = _out_products(ws, qs, p, 3, w_c, q_c, k_c, H * K, n_rows, s3, K, C, BK, LOW)
            v_new = load_rows(u_ptr + row0 * V, H * V, n_rows, 0, iv, V, C, BV) - ws
            p = tl.where(rc[:, None] >= rc[None, :], p, 0.0)
            o = scale * dot_split(p, v_new, qs, False, False, LOW)
            store_rows(o_ptr + row0 * V, o, H * V, n_rows, 0, iv, V, C, BV)
            if REUSE_KT:  # the update from the K^T tiles loaded above: one pipeline buffer less (at head dim
                # 128 three stages fit in shared memory), the tiles live across the step
                x_hi, x_lo = hi_lo(v_new, LOW)
                s0 = _plus_kt_tile(s0, 0, k0, x_hi, x_lo, K, BK, LOW, SPLIT)
                s1 = _plus_kt_tile(s1, 1, k1, x_hi, x_lo, K, BK, LOW, SPLIT)
                s2 = _plus_kt_tile(s2, 2, k2, x_hi, x_lo, K, BK, LOW, SPLIT)
                s3 = _plus_kt_tile(s3, 3, k3, x_hi, x_lo, K, BK, LOW, SPLIT)
        else:
            h_c, w_c = h_ptr + ((c0 + i) * H + i_h) * K * V, w_ptr + row0 * K
            ws = tl.zeros([C, BV], tl.float32)
            store_state(h_c, s0, s1, s2, s3, iv, K, V, BK, BV)
            ws = rows_times(ws, w_c, H * K, n_rows, s0, s1, s2, s3, K, C, BK, LOW, False)
            v_new = load_rows(u_ptr + row0 * V, H * V, n_rows, 0, iv, V, C, BV) - ws
            store_rows(u_ptr + row0 * V, v_new, H * V, n_rows, 0, iv, V, C, BV)
        if not (OUTPUT and REUSE_KT):
            s0, s1, s2, s3 = plus_kt_x(s0, s1, s2, s3, k_ptr + row0 * K, H * K, n_rows, v_new, K, C, BK, LOW,
                                       SPLIT)
    if HAS_FINAL:
        store_state(final_ptr + i_nh.to(tl.int64) * K * V, s0, s1, s2, s3, iv, K, V, BK, BV)


@triton.jit
def _ds_step(ds, i: tl.constexpr, q_c, w_c, stride, n_rows, do, x_neg, K: tl.constexpr, C: tl.constexpr,
             BK: tl.constexpr, LOW: tl.constexpr):
    """Tile i of dS' + Q^T dO + W^T X', both products accumulating into the tile (no temporaries)."""
    if i * BK < K:
        ds = dot_round(load_rows_t(q_c, stride, n_rows, 0, i, K, C, BK), do, ds, True, True, LOW)
        ds = dot_round(load_rows_t(w_c, stride, n_rows, 0, i, K, C, BK), x_neg, ds, True, True, LOW)
    return ds


@triton.jit
def state_bwd_kernel(q_ptr, k_ptr, w_ptr, do_ptr, dv_ptr, dh_ptr, dfinal_ptr, ds0_ptr, seqs_ptr, scale, T, NT,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, LOW: tl.constexpr, PACKED: tl.constexpr, HAS_DFINAL: tl.constexpr,
                     HAS_DS0: tl.constexpr, PREFETCH_DV: tl.constexpr):
    iv, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, c0, nt, length = sequence_of(i_n, T, NT, seqs_ptr, PACKED)
    scale = as_f32(scale)
    inv_scale = 1.0 / scale
    # The pass carries dS' = dS / scale: both products of its update then accumulate into it
    if HAS_DFINAL:
        ds0, ds1, ds2, ds3 = load_state(dfinal_ptr + i_nh.to(tl.int64) * K * V, iv, K, V, BK, BV)
        ds0, ds1, ds2, ds3 = ds0 * inv_scale, ds1 * inv_scale, ds2 * inv_scale, ds3 * inv_scale
    else:
        ds0 = tl.zeros([BK, BV], tl.float32)
        ds1, ds2, ds3 = ds0, ds0, ds0
    for j in range(nt):
        i = nt - 1 - j
        row0 = (bos + i * C) * H + i_h
        n_rows = tl.minimum(length - i * C, C)
        store_state(dh_ptr + ((c0 + i) * H + i_h) * K * V, ds0 * scale, ds1 * scale, ds2 * scale, ds3 * scale, iv, K,
                    V, BK, BV)
        dv_local = load_rows(dv_ptr + row0 * V, H * V, n_rows, 0, iv, V, C, BV) * inv_scale
        if PREFETCH_DV:  # added after the product: Triton then prefetches its load a step ahead, as it
            # does the products' operands (a product's accumulator it loads within the step)
            dv_new = dv_local + rows_times(tl.zeros([C, BV], tl.float32), k_ptr + row0 * K, H * K, n_rows, ds0, ds1,
                                           ds2, ds3, K, C, BK, LOW, False)
        else:  # one pipeline buffer less (shared memory)
            dv_new = rows_times(dv_local, k_ptr + row0 * K, H * K, n_rows, ds0, ds1, ds2, ds3, K, C, BK, LOW, False)
        store_rows(dv_ptr + row0 * V, dv_new * scale, H * V, n_rows, 0, iv, V, C, BV)  # dV_new = scale dV_new'
        x_neg = to_low(-dv_new, LOW)
        do = load_rows(do_ptr + row0 * V, H * V, n_rows, 0, iv, V, C, BV)
        q_c, w_c = q_ptr + row0 * K, w_ptr + row0 * K
        ds0 = _ds_step(ds0, 0, q_c, w_c, H * K, n_rows, do, x_neg, K, C, BK, LOW)
        ds1 = _ds_step(ds1, 1, q_c, w_c, H * K, n_rows, do, x_neg, K, C, BK, LOW)
        ds2 = _ds_step(ds2, 2, q_c, w_c, H * K, n_rows, do, x_neg, K, C, BK, LOW)
        ds3 = _ds_step(ds3, 3, q_c, w_c, H * K, n_rows, do, x_neg, K, C, BK, LOW)
    if HAS_DS0:
        store_state(ds0_ptr + i_nh.to(tl.int64) * K * V, ds0 * scale, ds1 * scale, ds2 * scale, ds3 * scale, iv, K, V,
                    BK, BV)
