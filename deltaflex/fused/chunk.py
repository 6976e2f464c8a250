"""The fused chunkwise delta rule: every launch of forward and backward, in order, in this file.

Forward, 2 launches (fla: 6):
  1. prepare_fwd   per chunk    T = (I + A)^-1 (kept for backward), W, U
  2. state_fwd     per head     o (in the caller's layout and dtype) from each chunk's start state,
                                the final state (OUTPUT_IN_STATE; else h[n] and V_new (over U), then
  3. output        per chunk    o from them)
  (long sequences at small B*H: 2 is segments.py's two-level pass, three launches over segments of chunks)
Backward, 5 launches (fla: 7 and a PyTorch sum):
  1. prepare_bwd   per chunk    W, U from the saved T; dV_local = scale tril(Q K^T)^T dO
  2. state_fwd     per head     h[n], V_new again (nothing per chunk is kept between the passes)
  3. state_bwd     per head     dh[n] (end-of-chunk state gradients), dV_new (over dV_local), ds0
  4. qk_grads      per chunk    dq; dk's terms through the output and the state (a float32 partial)
  5. wy_grads      per chunk    dv, dbeta; dk = the partial + its terms through W and T
dq, dk, dv, dbeta are each written once, in their inputs' layout and dtype.
Between forward and backward only the inputs and T (B T H C floats) are kept.

Inputs are token-major as fla takes them ([B, T, H, D]; packed sequences B = 1 with `Packing`);
intermediates are token-major too, so a ragged last chunk, or a packed sequence's, is masked rows,
never a padded copy. Precision: docs/design-fused.md (bf16 products with float32 accumulation,
float32 kept where the float64 oracle says it matters; float32 and fp16 inputs: 3xTF32 products).

A gated variant (a per-token decay g) would add g to these launches' arguments: the state passes
scale S (and dS) by exp(g_last) per chunk and rows by exp(g_last - g_t), the per-chunk kernels scale
A, P and dP by exp(g_i - g_j), as in the paper's gated form; the launch sequence stays.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton

from ..kernels.common import INTERPRETED, define_op, launch
from ..plan import FUSED_CHUNK_SIZES as CHUNK_SIZES  # noqa: F401  (the inverse's 16-row blocks: 16 to 64)
from ..validation import state_dtype
from .grads import qk_grads_kernel, wy_grads_kernel
from .output import output_kernel
from .prepare import prepare_bwd_kernel, prepare_fwd_kernel
from .segments import Segments, sm_count, state_two_level
from .state import state_bwd_kernel, state_fwd_kernel
from .tiles import block, launch_dims

_LOW = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class Packing(NamedTuple):
    """Packed sequences (B = 1) for the kernels, built on the host from their lengths."""

    chunks: torch.Tensor  # [total chunks, 2] int32: each chunk's first token and row count
    seqs: torch.Tensor  # [sequences, 4] int64: first token, first chunk, chunks, tokens

    @classmethod
    def of(cls, lengths: list[int], chunk_size: int, device) -> Packing:
        chunks, seqs, token, chunk = [], [], 0, 0
        for n in lengths:
            count = -(-n // chunk_size)
            chunks += [(token + j * chunk_size, min(chunk_size, n - j * chunk_size)) for j in range(count)]
            seqs.append((token, chunk, count, n))
            token, chunk = token + n, chunk + count
        return cls(torch.tensor(chunks, dtype=torch.int32).view(-1, 2).to(device),
                   torch.tensor(seqs, dtype=torch.int64).view(-1, 4).to(device))


# Launch parameters by key head dim (<= 64, <= 128, <= 256) and kernel: block sizes (capped by the head
# dims), num_warps, num_stages. From sweeps on the H200 (benchmarks/profile_kernels.py --sweep) within
# what the sm_90 builds fit: registers without spills where possible, 227 KiB of shared memory. A faster
# configuration whose results the GPU has not yet checked stays out (Triton 3.6 has built some wrong).
LAUNCH = {
    64: {"prepare_fwd": dict(num_warps=4, num_stages=2),
         "state_fwd": dict(BV=64, num_warps=4, num_stages=3),
         "state_out": dict(BV=64, num_warps=4, num_stages=3, REUSE_KT=False),  # H200: 0.130 ms (s2 0.195)
         "output": dict(BV=64, num_warps=4, num_stages=1),
         "prepare_bwd": dict(num_warps=4, num_stages=2),
         "state_bwd": dict(BV=32, num_warps=4, num_stages=3, PREFETCH_DV=False),
         "wy_grads": dict(BK=64, BV=64, num_warps=4, num_stages=1),
         "qk_grads": dict(BV=64, BK=64, num_warps=4, num_stages=3)},
    128: {"prepare_fwd": dict(num_warps=4, num_stages=1),
         "state_fwd": dict(BV=64, num_warps=4, num_stages=3),
         "state_out": dict(BV=64, num_warps=4, num_stages=3, REUSE_KT=True),  # H200: 0.252 ms (s2 0.259)
         "output": dict(BV=64, num_warps=4, num_stages=3),
         "prepare_bwd": dict(num_warps=4, num_stages=2),
         "state_bwd": dict(BV=64, num_warps=4, num_stages=3, PREFETCH_DV=True),
         "wy_grads": dict(BK=64, BV=64, num_warps=4, num_stages=2),
         "qk_grads": dict(BV=64, BK=128, num_warps=4, num_stages=2)},
    256: {"prepare_fwd": dict(num_warps=4, num_stages=1),
         "state_fwd": dict(BV=64, num_warps=4, num_stages=2),
         "state_out": dict(BV=32, num_warps=4, num_stages=1, REUSE_KT=False),  # (OUTPUT_IN_STATE off)
         "output": dict(BV=128, num_warps=4, num_stages=3),
         "prepare_bwd": dict(num_warps=4, num_stages=1),
         "state_bwd": dict(BV=64, num_warps=4, num_stages=2, PREFETCH_DV=False),
         "wy_grads": dict(BK=64, BV=64, num_warps=4, num_stages=2),
         "qk_grads": dict(BV=64, BK=128, num_warps=4, num_stages=2)},
}
# NARROW_BLOCKS_FAULT: Triton 3.6 on the H200 built a one-kernel form of the gradients with 32-wide blocks
# and 4 or 8 warps to read shared memory out of bounds (compute-sanitizer; benchmarks/probes/
# fused_configs.py finds such configurations); 64-wide blocks were right at 2, 4 and 8 warps, 32-wide
# ones at 2, and a test with K = 32 faulted at the table's launches. Head dims under 64 (narrow key or
# value blocks everywhere) therefore launch every kernel with 2 warps: on the H200 that is right at K = V
# = 16 and K = 32, V = 24, where wy_grads at 4 warps faults (benchmarks/probes/fused_nan.py).
NARROW_WARPS = 2
SPLIT_STATE = True  # the state update's V_new as hi + lo (state.py)
# The forward's output from its state pass (state.py's OUTPUT: no h, no V_new through memory) at key
# head dims up to 64, 128, 256; else output.py's kernel after the pass. Head dim 256: at BV = 64 the
# pass exceeds sm_90's shared memory, and at BV = 32 Triton 3.6 built it wrong on the H200 (NaN, an
# illegal address; right in the interpreter). Writing the output lengthens each step of the walk by
# about OUTPUT_STEP_MS[head dim] for every wave of programs over the SMs, where output.py's kernel, in
# parallel, takes about OUTPUT_KERNEL_MS a token, head and value column (0.13 ms at 4 x 4096 x 16 x
# 128); the cheaper one is taken. H200, eleventh session (kernels alone, the pass writing the output
# against the pass then output.py's): 4 x 4096 x 32 x 64 0.130 against 0.123 + 0.123 ms, 2 x 8192 x 32
# x 64 0.246 against 0.150 + 0.124, 4 x 4096 x 16 x 128 0.252 against 0.143 + 0.133, 2 x 8192 x 16 x
# 128 (128 steps, one wave) 0.465 against 0.194 + 0.134.
OUTPUT_IN_STATE = {64: True, 128: True, 256: False}
OUTPUT_STEP_MS = {64: 0.5e-3, 128: 1.7e-3, 256: 1.7e-3}  # 256: not measured (OUTPUT_IN_STATE off), 128's
OUTPUT_KERNEL_MS = 0.13 / (4 * 4096 * 16 * 128)
# Few programs (long sequences at small B H): the state passes with value blocks half as wide where
# twice the programs still fit the SMs in one wave. H200, ms of state_fwd / state_bwd alone, 64 -> 32
# wide: 2 x 8192 x 8 x 256 0.504 -> 0.390 / 0.600 -> 0.519, 2 x 8192 x 16 x 128 0.248 -> 0.194 /
# 0.311 -> 0.211, 2 x 8192 x 32 x 64 0.183 -> 0.150 (state_bwd is 32 wide there already); results
# checked there (benchmarks/probes/fused_configs.py). Not for the pass that writes the output (its
# 32-wide build is the wrong one above).
NARROW_STATE_WHEN_FEW = True


def _output_in_state(K: int, V: int, rows: int, steps: int, tokens: int, device: torch.device) -> bool:
    """Whether the forward's state pass writes the output: `rows` sequences (or segments) x heads, each
    walking at most `steps` chunks, over `tokens` x heads in all (off CUDA: one wave)."""
    if not OUTPUT_IN_STATE[launch_dims(K)]:
        return False
    programs = rows * triton.cdiv(V, _opts("state_out", K, V)["BV"])
    waves = triton.cdiv(programs, sm_count(device)) if device.type == "cuda" else 1
    return waves * steps * OUTPUT_STEP_MS[launch_dims(K)] <= tokens * V * OUTPUT_KERNEL_MS


def _opts(kernel: str, K: int, V: int) -> dict:
    """The kernel's launch keywords at head dims K, V (block sizes capped by them)."""
    opts = dict(LAUNCH[launch_dims(K)][kernel])
    for name, d in (("BK", K), ("BV", V)):
        if name in opts:
            opts[name] = block(d, opts[name])
    if min(K, V) < 64:  # NARROW_BLOCKS_FAULT
        opts["num_warps"] = NARROW_WARPS
    if INTERPRETED and kernel.startswith("state"):
        opts["BV"] = block(V)  # fewer programs: the interpreter's time goes per program
    return opts


def _state_opts(kernel: str, K: int, V: int, rows: int, device: torch.device) -> dict:
    """A state pass's launch keywords for `rows` sequences x heads (NARROW_STATE_WHEN_FEW)."""
    opts = _opts(kernel, K, V)
    if NARROW_STATE_WHEN_FEW and device.type == "cuda" and opts["BV"] > 32 and V > 32:
        if 2 * rows * triton.cdiv(V, opts["BV"]) <= sm_count(device):
            opts["BV"] = opts["BV"] // 2
    return opts


def _state_fwd_opts(output: bool, K: int, V: int, rows: int, device: torch.device) -> dict:
    """state_fwd_kernel's launch keywords, the pass writing the output or not, every knob given (the
    other branch's at its default: Inductor's analysis of a kernel takes no constexpr defaults)."""
    opts = _opts("state_out", K, V) if output else _state_opts("state_fwd", K, V, rows, device)
    return {"REUSE_KT": False, **opts}


def _empty(*shape, dtype, like: torch.Tensor) -> torch.Tensor:
    """Every buffer the launches write (tests poison it, to see that every element is written)."""
    return torch.empty(*shape, dtype=dtype, device=like.device)


def _geometry(q, v, chunk_size, chunks, seqs):
    """(B, T, H, K, V, chunk programs, sequences, chunks per sequence)."""
    B, T, H, K = q.shape
    NT = triton.cdiv(T, chunk_size)
    if chunks is None:
        return B, T, H, K, v.shape[-1], NT, B, NT
    return B, T, H, K, v.shape[-1], chunks.shape[0], seqs.shape[0], NT


def _forward_fake(q, k, v, beta, s0, scale, chunk_size, chunks=None, seqs=None, segment=0, segment_table=None,
                  segment_of_sequence=None, keep_t=True):
    B, T, H, K, V, n_chunks, S, _ = _geometry(q, v, chunk_size, chunks, seqs)
    return (_empty(B, T, H, V, dtype=v.dtype, like=q), _empty(S, H, K, V, dtype=state_dtype(q.dtype), like=q),
            _empty(*((B, T, H, chunk_size) if keep_t else (0,)), dtype=torch.float32, like=q))


@define_op("fused_fwd", _forward_fake)
def fused_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, s0: Optional[torch.Tensor],
                  scale: float, chunk_size: int, chunks: Optional[torch.Tensor] = None,
                  seqs: Optional[torch.Tensor] = None, segment: int = 0, segment_table: Optional[torch.Tensor] = None,
                  segment_of_sequence: Optional[torch.Tensor] = None, keep_t: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o [B, T, H, V] in v's dtype, final state [sequences, H, K, V] float32, T [B, T, H, C] float32).
    segment > 1: the two-level state pass in segments of that many chunks (segments.py; packed
    sequences: with their `Segments` tables). keep_t False (no gradient will be asked for: inference,
    prefill): T is not written and comes back empty."""
    B, T, H, K, V, n_chunks, S, NT = _geometry(q, v, chunk_size, chunks, seqs)
    C, LOW, PACKED = chunk_size, _LOW[q.dtype], chunks is not None
    BK = block(K)
    o, final, t = _forward_fake(q, k, v, beta, s0, scale, chunk_size, chunks, seqs, keep_t=keep_t)
    # A pointer a launch never touches (no packed sequences, no initial state) is None (Triton makes it
    # a constant). Not a stand-in buffer: torch.compile's analysis counts the sequence tables as written
    # (their values address stores), so its functional form clones each such argument, and where one
    # buffer stands in for two arguments, the untouched clone replaces what the kernel wrote.
    w = _empty(*k.shape, dtype=k.dtype, like=k)
    u = _empty(B, T, H, V, dtype=torch.float32, like=k)  # (without the output in the state pass: V_new after it)
    sizes = dict(H=H, K=K, V=V, C=C, LOW=LOW, PACKED=PACKED)
    launch(prepare_fwd_kernel, (n_chunks, B * H), k, v, beta, t if keep_t else None, w, u, chunks, T, NT, BK=BK,
           BV=block(V), STORE_T=keep_t, **sizes, **_opts("prepare_fwd", K, V))
    # the state pass's programs walk sequences (or, two-level, segments of `segment` chunks) per head;
    # packed one-level: NT counts every token's chunks, a bound on the longest walk
    n_segs = 0 if segment <= 1 else (segment_table.shape[0] if PACKED else S * triton.cdiv(NT, segment))
    rows, steps = (n_segs * H, segment) if segment > 1 else (S * H, NT)
    fused_output = _output_in_state(K, V, rows, steps, B * T * H, q.device)
    h = None if fused_output else _empty(n_chunks if PACKED else B * NT, H, K, V, dtype=k.dtype, like=k)
    out = (q, o, scale) if fused_output else (None, None, 1.0)
    opts = _state_fwd_opts(fused_output, K, V, rows, q.device)
    if segment > 1:
        segments = Segments(segment_table, segment_of_sequence) if PACKED else None
        state_two_level(k, w, u, h, s0, final, segments, T, NT, S, segment, sizes, opts, SPLIT_STATE, _empty, *out)
    else:
        launch(state_fwd_kernel, (triton.cdiv(V, opts["BV"]), S * H), out[0], k, w, u, h, out[1], s0, final, seqs,
               out[2], T, NT, BK=BK, HAS_S0=s0 is not None, HAS_FINAL=True, SPLIT=SPLIT_STATE, OUTPUT=fused_output,
               **sizes, **opts)
    if not fused_output:
        launch(output_kernel, (n_chunks, B * H), q, k, u, h, o, chunks, scale, T, NT, BK=BK, **sizes,
               **_opts("output", K, V))
    return o, final, t


def _ds0(q, s0):
    return _empty(*((0,) if s0 is None else s0.shape), dtype=torch.float32, like=q)


def _backward_fake(q, k, v, beta, t, s0, do, dfinal, scale, chunk_size, chunks=None, seqs=None):
    return tuple(_empty(*x.shape, dtype=x.dtype, like=x) for x in (q, k, v, beta)) + (_ds0(q, s0),)


@define_op("fused_bwd", _backward_fake)
def fused_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, t: torch.Tensor,
                   s0: Optional[torch.Tensor], do: torch.Tensor, dfinal: Optional[torch.Tensor], scale: float,
                   chunk_size: int, chunks: Optional[torch.Tensor] = None, seqs: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbeta in their inputs' dtypes, ds0 float32 or empty without s0)."""
    B, T, H, K, V, n_chunks, S, NT = _geometry(q, v, chunk_size, chunks, seqs)
    C, LOW, PACKED = chunk_size, _LOW[q.dtype], chunks is not None
    BK = block(K)
    ds0 = _ds0(q, s0)
    # buffers are taken as late and freed as early as the launches allow: the peak is at qk_grads
    w = _empty(*k.shape, dtype=k.dtype, like=k)
    u = _empty(B, T, H, V, dtype=torch.float32, like=k)  # U, then V_new
    dv_new = _empty(B, T, H, V, dtype=torch.float32, like=k)  # dV_local, then dV_new
    h = _empty(n_chunks if PACKED else B * NT, H, K, V, dtype=k.dtype, like=k)
    dh = _empty(*h.shape, dtype=h.dtype, like=h)
    sizes = dict(H=H, K=K, V=V, C=C, LOW=LOW, PACKED=PACKED)
    launch(prepare_bwd_kernel, (n_chunks, B * H), q, k, v, beta, t, do, w, u, dv_new, chunks, scale, T, NT, BK=BK,
           BV=block(V), **sizes, **_opts("prepare_bwd", K, V))
    opts = _state_fwd_opts(False, K, V, S * H, q.device)
    launch(state_fwd_kernel, (triton.cdiv(V, opts["BV"]), S * H), None, k, w, u, h, None, s0, None,
           seqs, 1.0, T, NT, BK=BK, HAS_S0=s0 is not None, HAS_FINAL=False, SPLIT=SPLIT_STATE, OUTPUT=False,
           **sizes, **opts)
    opts = _state_opts("state_bwd", K, V, S * H, q.device)
    launch(state_bwd_kernel, (triton.cdiv(V, opts["BV"]), S * H), q, k, w, do, dv_new, dh,
           dfinal, ds0 if s0 is not None else None, seqs, scale, T, NT, BK=BK,
           HAS_DFINAL=dfinal is not None, HAS_DS0=s0 is not None, **sizes, **opts)
    del w
    dq = _empty(*q.shape, dtype=q.dtype, like=q)
    dk_part = _empty(B, T, H, K, dtype=torch.float32, like=k)
    qk = _opts("qk_grads", K, V)
    launch(qk_grads_kernel, (triton.cdiv(K, qk["BK"]), n_chunks, B * H), q, k, do, h, dh, u, dq, dk_part, chunks,
           scale, T, NT, **sizes, **qk)
    del dh, u
    dk, dv, dbeta = (_empty(*x.shape, dtype=x.dtype, like=x) for x in (k, v, beta))
    launch(wy_grads_kernel, (n_chunks, B * H), k, v, beta, t, h, dv_new, dk_part, dk, dv, dbeta, chunks, T, NT, **sizes,
           **_opts("wy_grads", K, V))
    return dq, dk, dv, dbeta, ds0
