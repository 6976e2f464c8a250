"""Stage 3, the state pass, as single-launch Triton kernels that loop over every chunk.

Forward (`state_fwd_kernel`): one program per (batch*head, block of BV value columns) keeps its
[K, BV] slice of the state in registers and walks the N chunks in order:
    states[n] = S;  V_new_n = U_n - W_n S;  S <- S + K_n^T V_new_n.
Backward (`state_bwd_kernel`): the same grid walks the chunks in reverse with dS:
    ds_next[n] = dS;  dV_new_n = dV_local_n + K_n dS;  dS <- dS + scale Q_n^T dO_n - W_n^T dV_new_n,
then `state_grads_kernel`, one program per (chunk, block of BK key columns), forms
dK_n = V_new_n ds_next[n]^T and dW_n = -dV_new_n states[n]^T over blocks of BV values.

Layouts: q, k and dO are read in the chunk layout or the caller's token layout (common.chunk_rows);
everything written is in the chunk layout.

Grid: (cdiv(V, BV), B*H) for the passes, (cdiv(K, BK), B*H*N) for the gradients. Blocks: in the
passes the state is up to four [BK, BV] tiles, BK <= 64 (K <= 256), BV from `pass_config`; C (the
chunk size) is one tile; masks cover head dims that are not powers of two. ds_next is materialised
only inside the backward stage's call (float32, transient).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import (FP32, INTERPRETED, as_f32, block, check_tensors, chunk_rows, define_op, exact, f32, geometry,
                     launch, load_rows, load_state, load_tile, mma, policy_of, precision, store_state, store_tile,
                     warps_stages)


# Launch parameters (BV, num_warps, num_stages) of the passes over chunks by key dim (<= 64, <= 128,
# <= 256): the forward pass and the backward pass. Chosen from register and shared-memory counts of the kernels compiled for sm_90: the
# [BK, BV] float32 state tiles, one chunk's tiles of W (and Q) and their bf16 halves must fit 255
# registers a thread and 227 KiB of shared memory. benchmarks/profile_kernels.py --sweep times alternatives.
PASS_CONFIGS = {
    "bf16": {
        64: {"forward": (32, 4, 2), "backward": (32, 4, 2)},
        128: {"forward": (16, 4, 2), "backward": (16, 8, 2)},
        256: {"forward": (16, 8, 2), "backward": (16, 4, 2)},
    },
    # float32 inputs (3xTF32 products, larger register tiles: these spill past K = 64)
    "fp32": {
        64: {"forward": (16, 4, 1), "backward": (16, 4, 1)},
        128: {"forward": (16, 8, 1), "backward": (16, 8, 1)},
        256: {"forward": (16, 8, 1), "backward": (16, 8, 1)},
    },
}


def pass_config(K: int, V: int, C: int, POLICY: int, kind: str, bv: int = 0, num_warps: int = 0,
                num_stages: int = 0) -> dict:
    """Launch parameters of a pass over chunks (`kind`: "forward", "backward"): BK
    (key rows of a state tile, <= 64: the state is up to four tiles), BV, num_warps, num_stages.
    Nonzero bv, num_warps, num_stages (a plan's launch configuration) replace the table's."""
    table = PASS_CONFIGS["fp32" if POLICY == FP32 else "bf16"]
    BV, warps, stages = table[next(d for d in (64, 128, 256) if K <= d)][kind]
    if C >= 128:  # chunk tiles twice as tall: no second pipeline stage (shared memory), more warps
        warps, stages = 8, 1
    if INTERPRETED:  # registers do not matter there, program count does (time)
        BV = bv = 64
    BV, num_warps, num_stages = bv or BV, num_warps or warps, num_stages or stages
    cfg = dict(BK=block(K, 64), BV=min(BV, block(V)), num_warps=num_warps, num_stages=num_stages)
    return cfg


@triton.jit
def _sequence_state(ptr, seq_ptr, n, bh, K: tl.constexpr, V: tl.constexpr):
    """The [K, V] state of the packed sequence chunk n belongs to, for head bh (B = 1: bh = h), in a
    [S, H, K, V] tensor at ptr."""
    return ptr + (tl.load(seq_ptr + n) * tl.num_programs(1) + bh) * K * V


@triton.jit
def _rows_times_state(acc, a_c, a_stride, n_rows, s0, s1, s2, s3, C: tl.constexpr, K: tl.constexpr,
                      BK: tl.constexpr, A_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr):
    """acc + A S for a chunk's [C, K] rows A at a_c (`a_stride` apart, `n_rows` of them) and a state in
    four [BK, BV] tiles (W S, K dS)."""
    acc = mma(load_rows(a_c, a_stride, n_rows, 0, 0, K, C, BK), s0, acc, A_EXACT, False, POLICY, LOW)
    if BK < K:
        acc = mma(load_rows(a_c, a_stride, n_rows, 0, 1, K, C, BK), s1, acc, A_EXACT, False, POLICY, LOW)
    if 2 * BK < K:
        acc = mma(load_rows(a_c, a_stride, n_rows, 0, 2, K, C, BK), s2, acc, A_EXACT, False, POLICY, LOW)
    if 3 * BK < K:
        acc = mma(load_rows(a_c, a_stride, n_rows, 0, 3, K, C, BK), s3, acc, A_EXACT, False, POLICY, LOW)
    return acc


@triton.jit
def _state_plus_kt_x(s0, s1, s2, s3, k_c, k_stride, n_rows, x, C: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                     K_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr):
    """S + K^T X, tile by tile, for a chunk's keys at k_c (common.chunk_rows) and X [C, BV] (the
    state update)."""
    s0 = mma(tl.trans(load_rows(k_c, k_stride, n_rows, 0, 0, K, C, BK)), x, s0, K_EXACT, False, POLICY, LOW)
    if BK < K:
        s1 = mma(tl.trans(load_rows(k_c, k_stride, n_rows, 0, 1, K, C, BK)), x, s1, K_EXACT, False, POLICY, LOW)
    if 2 * BK < K:
        s2 = mma(tl.trans(load_rows(k_c, k_stride, n_rows, 0, 2, K, C, BK)), x, s2, K_EXACT, False, POLICY, LOW)
    if 3 * BK < K:
        s3 = mma(tl.trans(load_rows(k_c, k_stride, n_rows, 0, 3, K, C, BK)), x, s3, K_EXACT, False, POLICY, LOW)
    return s0, s1, s2, s3


@triton.jit
def state_fwd_kernel(k_ptr, w_ptr, u_ptr, s0_ptr, v_new_ptr, states_ptr, final_ptr, seq_ptr, first_ptr, last_ptr, N,
                     H, T, table_ptr,
                     K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     K_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr, SEGMENTED: tl.constexpr,
                     LAYOUT: tl.constexpr):
    iv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    # the state, as up to four [BK, BV] tiles (those past K stay zero and unused)
    if SEGMENTED:  # packed sequences (B = 1, bh = h): each loads its own s0[seq, h] at its first chunk
        s0 = tl.zeros([BK, BV], tl.float32)
        s1, s2, s3 = s0, s0, s0
    else:
        s0, s1, s2, s3 = load_state(s0_ptr + bh * K * V, iv, K, V, BK, BV)
    for n in range(N):
        chunk = bh * N + n
        if SEGMENTED:
            if tl.load(first_ptr + n) != 0:
                s0, s1, s2, s3 = load_state(_sequence_state(s0_ptr, seq_ptr, n, bh, K, V), iv, K, V, BK, BV)
        k_off, k_stride, n_rows = chunk_rows(chunk, N, H, T, table_ptr, C, K, LAYOUT)
        states_c = states_ptr + chunk * K * V
        store_state(states_c, s0, s1, s2, s3, iv, K, V, BK, BV)
        # V_new = U - W S
        ws = _rows_times_state(tl.zeros([C, BV], tl.float32), w_ptr + chunk * C * K, K, C, s0, s1, s2, s3, C, K, BK,
                               False, POLICY, LOW)
        v_new = load_tile(u_ptr + chunk * C * V, 0, iv, C, V, C, BV) - ws
        store_tile(v_new_ptr + chunk * C * V, v_new, 0, iv, C, V, C, BV)
        # S <- S + K^T V_new
        s0, s1, s2, s3 = _state_plus_kt_x(s0, s1, s2, s3, k_ptr + k_off, k_stride, n_rows, v_new, C, K, BK, K_EXACT,
                                          POLICY, LOW)
        if SEGMENTED:
            if tl.load(last_ptr + n) != 0:
                store_state(_sequence_state(final_ptr, seq_ptr, n, bh, K, V), s0, s1, s2, s3, iv, K, V, BK, BV)
    if not SEGMENTED:
        store_state(final_ptr + bh * K * V, s0, s1, s2, s3, iv, K, V, BK, BV)


@triton.jit
def _ds_step(ds, i: tl.constexpr, q_c, q_stride, n_rows, w_c, do, dv_new, scale, C: tl.constexpr, K: tl.constexpr,
             BK: tl.constexpr, Q_EXACT: tl.constexpr, DO_EXACT: tl.constexpr, POLICY: tl.constexpr,
             LOW: tl.constexpr):
    """Tile i of dS + scale Q^T dO - W^T dV_new."""
    qdo = mma(tl.trans(load_rows(q_c, q_stride, n_rows, 0, i, K, C, BK)), do, tl.zeros(ds.shape, tl.float32),
              Q_EXACT, DO_EXACT, POLICY, LOW)
    return mma(tl.trans(load_tile(w_c, 0, i, C, K, C, BK)), -dv_new, ds + scale * qdo, False, False, POLICY, LOW)


@triton.jit
def state_bwd_kernel(q_ptr, k_ptr, w_ptr, do_ptr, dv_local_ptr, ds_final_ptr, dv_new_ptr, ds_next_ptr, ds0_ptr,
                     seq_ptr, first_ptr, last_ptr, scale, N, H, T, table_ptr,
                     K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     Q_EXACT: tl.constexpr, K_EXACT: tl.constexpr, DO_EXACT: tl.constexpr,
                     POLICY: tl.constexpr, LOW: tl.constexpr, SEGMENTED: tl.constexpr, LAYOUT: tl.constexpr):
    iv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    scale = as_f32(scale)
    if SEGMENTED:  # packed sequences: each starts (in reverse) from its own ds_final[seq, h] at its last chunk
        ds0 = tl.zeros([BK, BV], tl.float32)
        ds1, ds2, ds3 = ds0, ds0, ds0
    else:
        ds0, ds1, ds2, ds3 = load_state(ds_final_ptr + bh * K * V, iv, K, V, BK, BV)
    for i in range(N):
        n = N - 1 - i
        chunk = bh * N + n
        if SEGMENTED:
            if tl.load(last_ptr + n) != 0:
                ds0, ds1, ds2, ds3 = load_state(_sequence_state(ds_final_ptr, seq_ptr, n, bh, K, V), iv, K, V, BK,
                                                  BV)
        qk_off, qk_stride, n_rows = chunk_rows(chunk, N, H, T, table_ptr, C, K, LAYOUT)
        do_off, do_stride, _ = chunk_rows(chunk, N, H, T, table_ptr, C, V, LAYOUT)
        q_c, k_c, w_c = q_ptr + qk_off, k_ptr + qk_off, w_ptr + chunk * C * K
        ds_next_c = ds_next_ptr + chunk * K * V
        store_state(ds_next_c, ds0, ds1, ds2, ds3, iv, K, V, BK, BV)
        # dV_new = dV_local + K dS
        dv_new = _rows_times_state(load_tile(dv_local_ptr + chunk * C * V, 0, iv, C, V, C, BV), k_c, qk_stride, n_rows,
                                   ds0, ds1, ds2, ds3, C, K, BK, K_EXACT, POLICY, LOW)
        store_tile(dv_new_ptr + chunk * C * V, dv_new, 0, iv, C, V, C, BV)
        # dS <- dS + scale Q^T dO - W^T dV_new
        do = load_rows(do_ptr + do_off, do_stride, n_rows, 0, iv, V, C, BV)
        ds0 = _ds_step(ds0, 0, q_c, qk_stride, n_rows, w_c, do, dv_new, scale, C, K, BK, Q_EXACT, DO_EXACT, POLICY,
                       LOW)
        if BK < K:
            ds1 = _ds_step(ds1, 1, q_c, qk_stride, n_rows, w_c, do, dv_new, scale, C, K, BK, Q_EXACT, DO_EXACT,
                           POLICY, LOW)
        if 2 * BK < K:
            ds2 = _ds_step(ds2, 2, q_c, qk_stride, n_rows, w_c, do, dv_new, scale, C, K, BK, Q_EXACT, DO_EXACT,
                           POLICY, LOW)
        if 3 * BK < K:
            ds3 = _ds_step(ds3, 3, q_c, qk_stride, n_rows, w_c, do, dv_new, scale, C, K, BK, Q_EXACT, DO_EXACT,
                           POLICY, LOW)
        if SEGMENTED:
            if tl.load(first_ptr + n) != 0:
                store_state(_sequence_state(ds0_ptr, seq_ptr, n, bh, K, V), ds0, ds1, ds2, ds3, iv, K, V, BK, BV)
    if not SEGMENTED:
        store_state(ds0_ptr + bh * K * V, ds0, ds1, ds2, ds3, iv, K, V, BK, BV)


@triton.jit
def state_grads_kernel(v_new_ptr, dv_new_ptr, states_ptr, ds_next_ptr, dk_ptr, dw_ptr,
                       K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       POLICY: tl.constexpr, LOW: tl.constexpr):
    ik, chunk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    v_new_c, dv_new_c = v_new_ptr + chunk * C * V, dv_new_ptr + chunk * C * V
    states_c, ds_next_c = states_ptr + chunk * K * V, ds_next_ptr + chunk * K * V
    dk = tl.zeros([C, BK], tl.float32)
    dw = tl.zeros([C, BK], tl.float32)
    for j in range(0, tl.cdiv(V, BV)):
        dk = mma(load_tile(v_new_c, 0, j, C, V, C, BV), tl.trans(load_tile(ds_next_c, ik, j, K, V, BK, BV)), dk,
                 False, False, POLICY, LOW)
        dw = mma(-load_tile(dv_new_c, 0, j, C, V, C, BV), tl.trans(load_tile(states_c, ik, j, K, V, BK, BV)), dw,
                 False, False, POLICY, LOW)
    store_tile(dk_ptr + chunk * C * K, dk, 0, ik, C, K, C, BK)
    store_tile(dw_ptr + chunk * C * K, dw, 0, ik, C, K, C, BK)


def _state_fwd_fake(k, w, u, s0, seq, first, last, policy, low, bv=0, num_warps=0, num_stages=0, chunk_size=0,
                    chunk_table=None):
    B, H, N, C, K = w.shape
    V = u.shape[-1]
    return f32(B, H, N, C, V, like=k), f32(B, H, N, K, V, like=k), f32(*s0.shape, like=k)


@define_op("state_fwd", _state_fwd_fake)
def state_fwd(k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, s0: torch.Tensor, seq: torch.Tensor,
              first: torch.Tensor, last: torch.Tensor, policy: str, low: torch.dtype, bv: int = 0, num_warps: int = 0,
              num_stages: int = 0, chunk_size: int = 0, chunk_table: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """seq, first, last: [N] int32 chunk -> sequence, starts-it, ends-it of packed sequences, or empty
    (B independent sequences). k in the chunk layout, or (chunk_size > 0) in the token layout (packed
    sequences: placed by chunk_table, common.geometry); the rest in the chunk layout."""
    g, K, V = geometry(k, chunk_size, chunk_table), k.shape[-1], u.shape[-1]
    v_new, states, final = _state_fwd_fake(k, w, u, s0, seq, first, last, policy, low)
    POLICY, LOW = precision(policy, low)
    cfg = pass_config(K, V, g.C, POLICY, "forward", bv, num_warps, num_stages)
    grid = (triton.cdiv(V, cfg["BV"]), g.B * g.H)
    launch(state_fwd_kernel, grid, k, w, u, s0, v_new, states, final, seq, first, last, *g.kernel_args(), K=K, V=V,
           C=g.C, K_EXACT=exact(k, low), POLICY=POLICY, LOW=LOW, SEGMENTED=seq.numel() > 0, LAYOUT=g.layout, **cfg)
    return v_new, states, final


def _state_bwd_fake(q, k, w, v_new, states, do, dv_local, ds_final, seq, first, last, scale, policy, low, bv=0,
                    num_warps=0, num_stages=0, chunk_size=0, chunk_table=None):
    B, H, N, C, K = w.shape
    V = v_new.shape[-1]
    return (f32(B, H, N, C, V, like=k), f32(B, H, N, C, K, like=k), f32(B, H, N, C, K, like=k),
            f32(*ds_final.shape, like=k))


@define_op("state_bwd", _state_bwd_fake)
def state_bwd(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, v_new: torch.Tensor, states: torch.Tensor,
              do: torch.Tensor, dv_local: torch.Tensor, ds_final: torch.Tensor, seq: torch.Tensor, first: torch.Tensor,
              last: torch.Tensor, scale: float, policy: str, low: torch.dtype, bv: int = 0, num_warps: int = 0,
              num_stages: int = 0, chunk_size: int = 0, chunk_table: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, do in either layout (as state_fwd's k); the rest in the chunk layout."""
    g, K, V = geometry(k, chunk_size, chunk_table), k.shape[-1], v_new.shape[-1]
    dv_new, dw, dk, ds0 = _state_bwd_fake(q, k, w, v_new, states, do, dv_local, ds_final, seq, first, last, scale,
                                          policy, low)
    ds_next = f32(g.B, g.H, g.N, K, V, like=k)
    POLICY, LOW = precision(policy, low)
    cfg = pass_config(K, V, g.C, POLICY, "backward", bv, num_warps, num_stages)
    launch(state_bwd_kernel, (triton.cdiv(V, cfg["BV"]), g.B * g.H), q, k, w, do, dv_local, ds_final, dv_new,
           ds_next, ds0, seq, first, last, scale, *g.kernel_args(), K=K, V=V, C=g.C, Q_EXACT=exact(q, low),
           K_EXACT=exact(k, low), DO_EXACT=exact(do, low), POLICY=POLICY, LOW=LOW, SEGMENTED=seq.numel() > 0,
           LAYOUT=g.layout, **cfg)
    BK = block(K)
    launch(state_grads_kernel, (triton.cdiv(K, BK), g.B * g.H * g.N), v_new, dv_new, states, ds_next, dk, dw,
           K=K, V=V, C=g.C, BK=BK, BV=block(V), POLICY=POLICY, LOW=LOW, num_warps=4 if g.C <= 64 else 8)
    return dv_new, dw, dk, ds0


def _segment_args(segments, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seq, first, last) as [N] int32 for the kernels; empty tensors without packed sequences."""
    if segments is None:
        empty = torch.empty(0, dtype=torch.int32, device=like.device)
        return empty, empty, empty
    return tuple(x.flatten().to(torch.int32) for x in (segments.seq, segments.first, segments.last))


def _check_layout(segments, chunk_size: int, chunk_table) -> None:
    if chunk_size and (segments is None) != (chunk_table is None):
        raise ValueError("packed sequences (segments) read in the token layout need their chunk_table, and a "
                         "chunk_table needs the segments")


def _launch_args(config) -> tuple[int, int, int]:
    """(BV, num_warps, num_stages) of a launch configuration (blocks, num_warps, num_stages) of the
    passes over chunks; 0: the table's (pass_config)."""
    bv = 0 if config is None else dict(config[0]).get("BV", 0)
    return (bv, *warps_stages(config))


def state_forward(k, w, u, s0, dot, impl=None, segments=None, config=None, chunk_size=0, chunk_table=None):
    """The registered `state` stage: (v_new, states, final); `impl` is the compiled backend's stepping
    (one launch walks every chunk here); with `segments`, s0 and final are per packed sequence.
    chunk_size > 0: k is in the token layout."""
    check_tensors(k, w, u, s0)
    _check_layout(segments, chunk_size, chunk_table)
    policy, low = policy_of(dot)
    v_new, states, final = state_fwd(k.contiguous(), w.contiguous(), u.contiguous(), s0.contiguous(),
                                     *_segment_args(segments, k), policy, low, *_launch_args(config), chunk_size,
                                     chunk_table)
    if segments is not None:  # a sequence with no tokens keeps its initial state
        final = torch.where(segments.empty[:, None, None, None], s0, final)
    return v_new, states, final


def state_backward(q, k, w, v_new, states, do, dv_local, ds_final, scale, dot, impl=None, segments=None, config=None,
                   chunk_size=0, chunk_table=None):
    """The registered `state_backward` stage: (dv_new, dw, dk, ds0). chunk_size > 0: q, k, do are in
    the token layout."""
    check_tensors(q, k, w, v_new, states, do, dv_local, ds_final)
    _check_layout(segments, chunk_size, chunk_table)
    policy, low = policy_of(dot)
    args = (q, k, w, v_new, states, do, dv_local, ds_final)
    dv_new, dw, dk, ds0 = state_bwd(*(x.contiguous() for x in args), *_segment_args(segments, k), float(scale),
                                    policy, low, *_launch_args(config), chunk_size, chunk_table)
    if segments is not None:
        ds0 = torch.where(segments.empty[:, None, None, None], ds_final, ds0)
    return dv_new, dw, dk, ds0
