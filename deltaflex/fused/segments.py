"""The fused forward's two-level, sequence-parallel state pass: for long sequences at small B*H
(prefill), where the one-level pass (state.py: one program per sequence, head and value block,
walking every chunk in turn) leaves most SMs idle.

Each sequence's chunks go in segments of G (the last one shorter; a packed sequence's segments never
cross its boundary, and a sequence shorter than G is one segment). A chunk maps the state S to
E_n S + K_n^T U_n with E_n = I - K_n^T W_n, so a segment maps its start state to P S + D:
  1. segment_maps    per (segment, head, column block), in parallel:
                     P = E_last ... E_first [K, K] and D [K, V], float32, by the one-level walk
                     itself: P from I with U = 0 (S split into hi + lo as an operand: P is a product
                     of up to G Householder-like factors and must stay float32-accurate), D from 0
  2. segment_starts  per (sequence, head, value block), over the sequence's segments in order:
                     S_{j+1} = P_j S_j + D_j from the initial state (float32 products: both operands
                     split, or 3xTF32), each segment's start S_j, the final state
  3. state_fwd       (state.py, unchanged) per (segment, head, value block) from S_j, as if every
                     segment were a packed sequence of its own: h[n], V_new over U (or the output
                     itself), as the one-level pass
Phase 3 is the one-level pass's own walk, so h, V_new and o differ from it only through the start states.
Work: phase 1 reads W, K (and U) of every chunk once per column block of [P D], phase 3 is the
one-level pass; phase 2 is ceil(chunks / G) steps per sequence.

`segment_length` chooses G (0: the one-level pass) from the shape and the GPU's SM count.
Grids: 1. (cdiv(K, BV) + cdiv(V, BV), segments * H); 2. (cdiv(V, BV), sequences * H); 3. as state.py.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..plan import STATE_SEGMENTS
from ..kernels.common import INTERPRETED, dot_low, launch, load_rows, load_state, load_tile, store_state, to_low
from .state import plus_kt_x, rows_times, state_fwd_kernel
from .tiles import block, dot_fine, hi_lo, launch_dims, sequence_of

SEGMENT_CHUNKS = tuple(G for G in STATE_SEGMENTS if G > 1)  # the segment lengths G a plan may fix

# Launch parameters by key head dim (<= 64, <= 128, <= 256): phase 1 ("maps") and 2 ("starts").
# Not yet swept on the H200; the sm_90 builds fit without spills (benchmarks/kernel_resources.py): phase 2's
# P tiles all load at the top of its loop, hence its narrow value blocks at K >= 128.
LAUNCH = {
    64: {"maps": dict(BV=64, num_warps=4, num_stages=2), "starts": dict(BV=64, num_warps=4, num_stages=2)},
    128: {"maps": dict(BV=64, num_warps=4, num_stages=2), "starts": dict(BV=32, num_warps=4, num_stages=1)},
    256: {"maps": dict(BV=64, num_warps=4, num_stages=2), "starts": dict(BV=16, num_warps=4, num_stages=1)},
}

def _opts(kernel: str, K: int, V: int) -> dict:
    opts = dict(LAUNCH[launch_dims(K)][kernel])
    width = max(K, V) if kernel == "maps" else V  # phase 1's blocks cover P's K columns and D's V
    opts["BV"] = block(width) if INTERPRETED else block(width, opts["BV"])  # interpreter: fewer programs
    if min(K, V) < 64:  # NARROW_BLOCKS_FAULT (chunk.py)
        opts["num_warps"] = 2
    return opts


# ---------------------------------------------------------------------------------------------------
# The choice of G: a cost model in units of one chunk step of one program while every SM is busy.
# A lone program's step is faster (the SM's memory bandwidth is its own): LONE_STEP of a unit. Phase 1's
# steps store nothing (the one-level step also writes h and V_new): TRANSITION_STEP, CONTRIBUTION_STEP.
# Estimates from the one-level pass's figures on the H200 (docs/design-fused.md: 0.14 ms for 64 steps
# of 128 programs); benchmarks/bench_prefill.py measures the choice against fixed G.
LONE_STEP = 0.8
TRANSITION_STEP = 0.7
CONTRIBUTION_STEP = 0.7
COMBINE_STEP = 1.0  # phase 2: one segment (P and D read, P S + D)
EXTRA_LAUNCHES = 4.0  # two launches more than the one-level pass
MARGIN = 0.75  # the two-level pass only where predicted to take at most 3/4 of the one-level one's time


def _time(steps: float, work: float, sms: int) -> float:
    """A launch whose programs take `steps` steps in sequence and `work` program-steps in all."""
    return max(steps * LONE_STEP, work / sms)


def predicted_times(chunks: Sequence[int], H: int, K: int, V: int, G: int, sms: int) -> tuple[float, float]:
    """(one-level, two-level with segments of G chunks) state-pass times in the model's units, for
    sequences of `chunks` chunks each, H heads, head dims K, V, on `sms` SMs."""
    nv = triton.cdiv(V, 64)  # the state passes' value blocks (chunk.py's LAUNCH: BV = 64)
    nk = triton.cdiv(K, 64)
    longest, total = max([0, *chunks]), sum(chunks) * H  # (Dynamo 2.11 takes no max(default=))
    one = _time(longest, total * nv, sms)
    walk = min(G, longest)
    two = (_time(walk, total * (nk * TRANSITION_STEP + nv * CONTRIBUTION_STEP), sms)
           + max([0, *(triton.cdiv(n, G) for n in chunks)]) * COMBINE_STEP
           + _time(walk, total * nv, sms) + EXTRA_LAUNCHES)
    return one, two


def choose_segment(chunks: Sequence[int], H: int, K: int, V: int, sms: int) -> int:
    """The segment length G (in chunks) the model predicts fastest, or 0 where the one-level pass is
    (never chosen unless at most MARGIN of its time). Remembered per shape: the model costs ~0.2 ms of
    Python a call, on the host path of every forward (on the H200, where the call is host-bound:
    8 x 2048 x 32 x 64 forward+backward 1.690 -> 1.499 ms; docs/benchmarks.md)."""
    return _choose_segment(tuple(chunks), H, K, V, sms)


@functools.lru_cache(maxsize=4096)
def _choose_segment(chunks: tuple[int, ...], H: int, K: int, V: int, sms: int) -> int:
    best, best_time = 0, None
    for G in SEGMENT_CHUNKS:
        one, two = predicted_times(chunks, H, K, V, G, sms)
        if two <= MARGIN * one and (best_time is None or two < best_time):
            best, best_time = G, two
    return best


MAX_GRID_Y = 65535


def sm_count(device: torch.device) -> int:
    return _sm_count(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def segment_length(setting: int, chunks: Sequence[int], H: int, K: int, V: int, device: torch.device) -> int:
    """G for a plan's `state_segment` (0: chosen here; 1: the one-level pass; else G itself); 0 means
    the one-level pass. The automatic choice runs the one-level pass off CUDA (the interpreter)."""
    if setting == 1:
        return 0
    G = setting or (choose_segment(chunks, H, K, V, sm_count(device)) if device.type == "cuda" else 0)
    # segments * H programs on a grid axis of at most 65535: longer segments where they would not fit
    while G and sum(triton.cdiv(n, G) for n in chunks) * H > MAX_GRID_Y:
        G = next((g for g in SEGMENT_CHUNKS if g > G), 0)
    return G


class Segments(NamedTuple):
    """Packed sequences' segments for the kernels, built on the host from the sequences' lengths."""

    table: torch.Tensor  # [segments, 4] int64: first token, first global chunk, chunks, tokens (as Packing.seqs)
    of_sequence: torch.Tensor  # [sequences, 2] int64: each sequence's first segment and segment count

    @classmethod
    def of(cls, lengths: list[int], chunk_size: int, G: int, device) -> Segments:
        table, of_sequence, token, chunk = [], [], 0, 0
        for n in lengths:
            count = -(-n // chunk_size)
            span = G * chunk_size
            pieces = [(token + j * span, chunk + j * G, min(G, count - j * G), min(span, n - j * span))
                      for j in range(-(-count // G))]
            of_sequence.append((len(table), len(pieces)))
            table += pieces
            token, chunk = token + n, chunk + count
        return cls(torch.tensor(table, dtype=torch.int64).view(-1, 4).to(device),
                   torch.tensor(of_sequence, dtype=torch.int64).view(-1, 2).to(device))


# ---------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _identity_tile(i: tl.constexpr, ib, K: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Tile (i, ib) [BK, BV] of the K x K identity (zero outside it)."""
    r = i * BK + tl.arange(0, BK)
    c = ib * BV + tl.arange(0, BV)
    return tl.where((r[:, None] == c[None, :]) & (r[:, None] < K), 1.0, 0.0)


@triton.jit
def _segment_walk(k_ptr, w_ptr, u_ptr, out_ptr, bos, nt, length, i_h, ib, H: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, WIDTH: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  LOW: tl.constexpr, TRANSITION: tl.constexpr):
    """Column block ib of the segment's P (TRANSITION: from I, U = 0) or D (from 0), stored at out_ptr
    ([K, WIDTH] float32)."""
    if TRANSITION:
        s0, s1 = _identity_tile(0, ib, K, BK, BV), _identity_tile(1, ib, K, BK, BV)
        s2, s3 = _identity_tile(2, ib, K, BK, BV), _identity_tile(3, ib, K, BK, BV)
    else:
        s0 = tl.zeros([BK, BV], tl.float32)
        s1, s2, s3 = s0, s0, s0
    for i in range(nt):
        row0 = (bos + i * C) * H + i_h
        n_rows = tl.minimum(length - i * C, C)
        ws = rows_times(tl.zeros([C, BV], tl.float32), w_ptr + row0 * K, H * K, n_rows, s0, s1, s2, s3, K, C, BK,
                        LOW, TRANSITION)
        if TRANSITION:
            x = -ws
        else:
            x = load_rows(u_ptr + row0 * V, H * V, n_rows, 0, ib, V, C, BV) - ws
        s0, s1, s2, s3 = plus_kt_x(s0, s1, s2, s3, k_ptr + row0 * K, H * K, n_rows, x, K, C, BK, LOW, True)
    store_state(out_ptr, s0, s1, s2, s3, ib, K, WIDTH, BK, BV)


@triton.jit
def segment_maps_kernel(k_ptr, w_ptr, u_ptr, p_ptr, d_ptr, segs_ptr, T, NT, NS,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, G: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, LOW: tl.constexpr, PACKED: tl.constexpr):
    """Phase 1. Without packed sequences (NS segments a sequence) it also writes the segment table
    that phase 3 reads (packed: built on the host)."""
    ib, i_sh = tl.program_id(0), tl.program_id(1)
    i_s, i_h = i_sh // H, i_sh % H
    if PACKED:
        bos, _, nt, length = sequence_of(i_s, T, NT, segs_ptr, True)
    else:
        i_b, j = (i_s // NS).to(tl.int64), (i_s % NS).to(tl.int64)
        bos = i_b * T + j * (G * C)
        nt = tl.minimum(NT - j * G, G).to(tl.int32)
        length = tl.minimum(T - j * (G * C), G * C)
        if (ib == 0) & (i_h == 0):
            row = segs_ptr + 4 * i_s.to(tl.int64)
            tl.store(row, bos)
            tl.store(row + 1, i_b * NT + j * G)
            tl.store(row + 2, nt.to(tl.int64))
            tl.store(row + 3, length)
    NKB: tl.constexpr = (K + BV - 1) // BV
    i_sh = i_sh.to(tl.int64)
    if ib < NKB:
        _segment_walk(k_ptr, w_ptr, u_ptr, p_ptr + i_sh * K * K, bos, nt, length, i_h, ib, H, K, V, K, C, BK, BV,
                      LOW, True)
    else:
        _segment_walk(k_ptr, w_ptr, u_ptr, d_ptr + i_sh * K * V, bos, nt, length, i_h, ib - NKB, H, K, V, V, C, BK,
                      BV, LOW, False)


@triton.jit
def _p_dot(acc, p_c, i: tl.constexpr, m: tl.constexpr, s_hi, s_lo, s, K: tl.constexpr, BK: tl.constexpr,
           LOW: tl.constexpr):
    """acc + P[i, m] S_m, P float32 [K, K] at p_c: S split in advance into s_hi + s_lo (bf16: three
    products, as dot_fine), float32 and fp16 inputs: 3xTF32 on s."""
    if m * BK < K:
        p = load_tile(p_c, i, m, K, K, BK, BK)
        if LOW != 1:  # float32 and fp16 inputs: 3xTF32 (tiles.py)
            acc = dot_fine(p, s, acc, LOW)
        else:
            p_hi = to_low(p, LOW)
            acc = dot_low(p_hi, s_hi, acc)
            acc = dot_low(p_hi, s_lo, acc)
            acc = dot_low(to_low(p - p_hi.to(tl.float32), LOW), s_hi, acc)
    return acc


@triton.jit
def _p_times_s(acc, p_c, i: tl.constexpr, h0, l0, s0, h1, l1, s1, h2, l2, s2, h3, l3, s3, K: tl.constexpr,
               BK: tl.constexpr, LOW: tl.constexpr):
    """Tile i of acc + P S."""
    if i * BK < K:
        acc = _p_dot(acc, p_c, i, 0, h0, l0, s0, K, BK, LOW)
        acc = _p_dot(acc, p_c, i, 1, h1, l1, s1, K, BK, LOW)
        acc = _p_dot(acc, p_c, i, 2, h2, l2, s2, K, BK, LOW)
        acc = _p_dot(acc, p_c, i, 3, h3, l3, s3, K, BK, LOW)
    return acc


@triton.jit
def segment_starts_kernel(p_ptr, d_ptr, starts_ptr, s0_ptr, final_ptr, of_seq_ptr, NS,
                          H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          LOW: tl.constexpr, PACKED: tl.constexpr, HAS_S0: tl.constexpr):
    """Phase 2: every segment's start state (into starts, [segments, H, K, V] float32) and the final state."""
    iv, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    if PACKED:
        first = tl.load(of_seq_ptr + 2 * i_n)
        count = tl.load(of_seq_ptr + 2 * i_n + 1).to(tl.int32)
    else:
        first = i_n.to(tl.int64) * NS
        count = NS
    if HAS_S0:
        s0, s1, s2, s3 = load_state(s0_ptr + i_nh.to(tl.int64) * K * V, iv, K, V, BK, BV)
    else:
        s0 = tl.zeros([BK, BV], tl.float32)
        s1, s2, s3 = s0, s0, s0
    for j in range(count):
        sh = (first + j) * H + i_h
        store_state(starts_ptr + sh * K * V, s0, s1, s2, s3, iv, K, V, BK, BV)
        h0, l0 = hi_lo(s0, LOW)
        h1, l1 = hi_lo(s1, LOW)
        h2, l2 = hi_lo(s2, LOW)
        h3, l3 = hi_lo(s3, LOW)
        d0, d1, d2, d3 = load_state(d_ptr + sh * K * V, iv, K, V, BK, BV)
        p_c = p_ptr + sh * K * K
        n0 = _p_times_s(d0, p_c, 0, h0, l0, s0, h1, l1, s1, h2, l2, s2, h3, l3, s3, K, BK, LOW)
        n1 = _p_times_s(d1, p_c, 1, h0, l0, s0, h1, l1, s1, h2, l2, s2, h3, l3, s3, K, BK, LOW)
        n2 = _p_times_s(d2, p_c, 2, h0, l0, s0, h1, l1, s1, h2, l2, s2, h3, l3, s3, K, BK, LOW)
        n3 = _p_times_s(d3, p_c, 3, h0, l0, s0, h1, l1, s1, h2, l2, s2, h3, l3, s3, K, BK, LOW)
        s0, s1, s2, s3 = n0, n1, n2, n3  # (bf16/fp16: the float32 tiles are dead once split)
    store_state(final_ptr + i_nh.to(tl.int64) * K * V, s0, s1, s2, s3, iv, K, V, BK, BV)


def state_two_level(k, w, u, h, s0: Optional[torch.Tensor], final, segments: Optional[Segments], T: int, NT: int,
                    n_seqs: int, G: int, sizes: dict, state_opts: dict, split: bool, empty, q=None, o=None,
                    scale: float = 1.0) -> None:
    """The three phases, in place of chunk.py's one `state_fwd` launch: h[n], V_new over u, the final
    state; given o (and q, scale), the output instead of h and V_new (state.py's OUTPUT). `segments`:
    packed sequences' (sizes["PACKED"]); `empty`: chunk.py's buffer allocator."""
    H, K, V, LOW, PACKED = sizes["H"], sizes["K"], sizes["V"], sizes["LOW"], sizes["PACKED"]
    BK = block(K)
    NS = triton.cdiv(NT, G)
    n_segs = segments.table.shape[0] if PACKED else n_seqs * NS
    p = empty(n_segs, H, K, K, dtype=torch.float32, like=k)
    d = empty(n_segs, H, K, V, dtype=torch.float32, like=k)
    starts = empty(n_segs, H, K, V, dtype=torch.float32, like=k)
    table = segments.table if PACKED else torch.empty(n_segs, 4, dtype=torch.int64, device=k.device)  # phase 1 fills it
    of_sequence = segments.of_sequence if PACKED else None  # untouched pointers are None (chunk.py)
    maps = _opts("maps", K, V)
    if n_segs:
        launch(segment_maps_kernel, (triton.cdiv(K, maps["BV"]) + triton.cdiv(V, maps["BV"]), n_segs * H), k, w, u,
               p, d, table, T, NT, NS, H=H, K=K, V=V, C=sizes["C"], G=G, BK=BK, LOW=LOW, PACKED=PACKED, **maps)
    starts_opts = _opts("starts", K, V)
    launch(segment_starts_kernel, (triton.cdiv(V, starts_opts["BV"]), n_seqs * H), p, d, starts,
           s0, final, of_sequence, NS, H=H, K=K, V=V, BK=BK, LOW=LOW, PACKED=PACKED,
           HAS_S0=s0 is not None, **starts_opts)
    if n_segs:
        launch(state_fwd_kernel, (triton.cdiv(V, state_opts["BV"]), n_segs * H), q, k, w, u, h, o, starts, None,
               table, scale, T, NT, BK=BK, HAS_S0=True, HAS_FINAL=False, SPLIT=split, OUTPUT=o is not None,
               **{**sizes, "PACKED": True}, **state_opts)
