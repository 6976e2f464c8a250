"""What every kernel module shares: the precision policy inside a kernel (`mma`), tile loads and
stores, block sizes, launching (wrap_triton for compiled kernels, a direct call under
TRITON_INTERPRET=1) and the torch.library registration of each op.

Precision (chunk/matmul.py says the same for the compiled stages): products accumulate in float32.
POLICY is FP32 (float32 operands), SPLIT (bf16x3: an inexact float32 operand x is split into
hi = low(x), lo = low(x - hi) and the product is a_hi b_hi + a_hi b_lo + a_lo b_hi) or ROUND (bf16:
inexact operands rounded to the low dtype once). An operand flagged exact is already in the low
dtype (an input such as k or v) and enters the tensor cores as it is. Float32 products run as
3xTF32 (`input_precision="tf32x3"`: each operand split into two TF32 parts on the tensor cores,
about 22 significant bits, near float32 accuracy; plain TF32 is not accurate enough, and Triton's
IEEE float32 dot runs on the CUDA cores with register tiles too large for these kernels).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

FP32, SPLIT, ROUND = 0, 1, 2
_POLICY_CODES = {"fp32": FP32, "bf16x3": SPLIT, "bf16": ROUND}
_LOW_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
INPUT_DTYPES = tuple(_LOW_CODES)


def precision(policy: str, low: torch.dtype) -> tuple[int, int]:
    """(POLICY, LOW) constexprs of a policy name and low dtype; float32 inputs always give FP32."""
    if low not in _LOW_CODES:
        raise TypeError(
            f"the triton backend takes bfloat16, float16 or float32 inputs, got {low}; "
            "use the compiled backend (plan='compiled' or 'eager') for float64"
        )
    policy_code = FP32 if low == torch.float32 else _POLICY_CODES[policy]
    return policy_code, _LOW_CODES[low]


def policy_of(dot) -> tuple[str, torch.dtype]:
    """The (policy, low dtype) a stage's `dot` (functools.partial of chunk.matmul.dot) carries."""
    return dot.keywords["policy"], dot.keywords["low"]


def exact(x: torch.Tensor, low: torch.dtype) -> bool:
    return x.dtype == low


def check_tensors(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, except in the interpreter; float64 is not taken."""
    for x in tensors:
        if x.dtype == torch.float64:
            raise TypeError(
                "the triton backend takes bfloat16, float16 or float32 inputs, got float64; "
                "use the compiled backend (plan='compiled' or 'eager') for float64"
            )
        if x.device.type != "cuda" and not INTERPRETED:
            raise RuntimeError(
                f"the triton backend needs CUDA tensors, got a tensor on {x.device} "
                "(set TRITON_INTERPRET=1 before importing deltaflex.kernels to run it on the CPU)"
            )


def block(d: int, at_most: int = 64) -> int:
    """Block size for a dim of d: a power of two, at least 16 (tl.dot's minimum), at most `at_most`
    unless d itself is smaller."""
    return max(16, min(triton.next_power_of_2(d), at_most))


def warps_stages(config) -> tuple[int, int]:
    """(num_warps, num_stages) for a stage's ops from its launch configuration `config`, a plan's
    KernelConfig as the tuple (blocks, num_warps, num_stages) or None; 0: the kernel's own choice."""
    return (0, 0) if config is None else (config[1], config[2])


def launch_options(num_warps: int, num_stages: int) -> dict:
    """Launch keywords; num_stages 0 leaves Triton's default."""
    return {"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {})}


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), traceable inside a triton_op (wrap_triton) when compiled;
    the interpreter's kernels run directly."""
    if isinstance(kernel, JITFunction) or hasattr(kernel, "configs"):  # a jit kernel or an Autotuner
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def define_op(name: str, fake):
    """Decorator registering fn as the torch.library op deltaflex::name.

    With compiled kernels it is a `triton_op` (torch.compile traces into its kernels; its fake is
    fn itself, whose wrap_triton launches are recorded, not run). The interpreter's kernels cannot
    be wrapped, so there it is an opaque `custom_op` with the explicit `fake` (shapes and dtypes
    only), which tests check against the real outputs.
    """

    def register(fn):
        if INTERPRETED:
            op = torch.library.custom_op(f"deltaflex::{name}", fn, mutates_args=())
            op.register_fake(fake)
        else:
            op = torch.library.triton_op(f"deltaflex::{name}", fn, mutates_args=())
        op.fake = fake  # kept for tests
        op.launcher = fn  # the implementation itself (benchmarks/kernel_resources.py runs it on meta tensors)
        return op

    return register


class Geometry(NamedTuple):
    """How an op's inputs are chunked: B sequences of T tokens, H heads, N chunks of C rows, read in
    `layout` (CHUNKS, TOKENS or PACKED, placed by `table`; see chunk_rows). Outside PACKED the kernels
    never read `table`, which is then the input itself (a pointer argument, no allocation)."""

    B: int
    H: int
    N: int
    C: int
    T: int
    layout: int
    table: torch.Tensor

    def kernel_args(self) -> tuple:
        """(N, H, T, table): the runtime arguments of `chunk_rows`."""
        return self.N, self.H, self.T, self.table


def geometry(x: torch.Tensor, chunk_size: int = 0, chunk_table: torch.Tensor | None = None) -> Geometry:
    """The Geometry of an op's input x: (chunk_size 0) the chunk layout [B, H, N, C, D]; else the
    token layout [B, T, H, D] in chunks of `chunk_size` rows, or, given `chunk_table` ([N, 2] int64:
    each chunk's first token and token count), packed sequences [1, T, H, D]."""
    if not chunk_size:
        B, H, N, C = x.shape[:4]
        return Geometry(B, H, N, C, N * C, CHUNKS, x)
    B, T, H = x.shape[:3]
    if chunk_table is not None:
        return Geometry(B, H, chunk_table.shape[0], chunk_size, T, PACKED, chunk_table)
    return Geometry(B, H, (T + chunk_size - 1) // chunk_size, chunk_size, T, TOKENS, x)


def f32(*shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(*shape, dtype=torch.float32, device=like.device)


@triton.jit
def _probe():
    pass


# Set by triton.jit itself: its interpreter (TRITON_INTERPRET=1 when this module was imported)
# hands back plain Python functions instead of JITFunctions.
INTERPRETED = not isinstance(_probe, JITFunction)
# The interpreter multiplies bf16 tiles as raw integers and truncates float32 -> bf16; there,
# low-precision products run on the float32 values of operands rounded as a GPU rounds them.
_UPCAST_LOW_DOTS = tl.constexpr(INTERPRETED)


@triton.jit
def to_low(x, LOW: tl.constexpr):
    if LOW == 1:
        if _UPCAST_LOW_DOTS:
            if x.dtype == tl.float32:
                # The interpreter truncates float32 -> bf16; GPUs round to nearest. Veltkamp's split
                # rounds x to bf16's 8 significant bits first, so the cast below is exact.
                t = x * 65537.0
                x = t - (t - x)
        return x.to(tl.bfloat16)
    elif LOW == 2:
        return x.to(tl.float16)
    else:
        return x.to(tl.float32)


@triton.jit
def cast_for(x, ptr):
    """x in the element type of ptr, rounded to nearest as GPUs round (the interpreter truncates
    float32 -> bf16 in a cast: Veltkamp's split rounds to bf16's 8 significant bits first there)."""
    if _UPCAST_LOW_DOTS:
        if ptr.dtype.element_ty == tl.bfloat16:
            t = x * 65537.0
            x = t - (t - x)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def as_f32(x):
    """A float argument in float32: torch.compile passes Python floats to kernels as fp64, which
    would carry every product they scale into float64."""
    if _UPCAST_LOW_DOTS:  # the interpreter hands it over as a Python float
        return x
    else:  # tl.cast, not x.to: Inductor's mutation analysis traces the kernel with a constant float
        return tl.cast(x, tl.float32)


@triton.jit
def dot_low(a, b, acc):
    """acc + a @ b of two low-precision tiles, accumulated in float32 (the tensor cores' product)."""
    if _UPCAST_LOW_DOTS:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def mma(a, b, acc, A_EXACT: tl.constexpr, B_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr):
    """acc + a @ b in float32 under POLICY; an operand flagged exact is taken as it is in LOW."""
    if POLICY == 0:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    elif POLICY == 2 or (A_EXACT and B_EXACT):
        acc = dot_low(to_low(a, LOW), to_low(b, LOW), acc)
    else:  # SPLIT: the rounding error of each inexact operand, times the other's high part
        a_hi = to_low(a, LOW)
        if not A_EXACT:
            a_lo = to_low(a - a_hi.to(tl.float32), LOW)
        b_hi = to_low(b, LOW)
        if not B_EXACT:
            b_lo = to_low(b - b_hi.to(tl.float32), LOW)
        acc = dot_low(a_hi, b_hi, acc)
        if not B_EXACT:
            acc = dot_low(a_hi, b_lo, acc)
        if not A_EXACT:
            acc = dot_low(a_lo, b_hi, acc)
    return acc


@triton.jit
def mma_f32(a, b, acc):
    """acc + a @ b of two float32 operands at near float32 accuracy whatever the policy (3xTF32):
    for the triangular solve, whose factors must not be rounded to bf16."""
    return tl.dot(a, b, acc, input_precision="tf32x3")


@triton.jit
def invert_unit_lower_16(a, r, c, LOW: tl.constexpr):
    """inv(I + a) of each strictly lower 16 x 16 block of a ([16, 16], or [NB, 16, 16] for a batch),
    r and c the row and column index within the block, broadcast to a's shape. By doubling: with X the
    inverse of the diagonal s x s blocks and L the s x s blocks just below them (within 2s x 2s
    blocks), the inverse of the diagonal 2s x 2s blocks is X - X L X (L X L = 0 there); s = 1 is
    I - L, s = 2, 4, 8 are products on the tensor cores, both operands split into hi + lo in LOW
    (3xTF32 for LOW = 0). On the H200 this made the fused path's inverse 1.7x faster than forward
    substitution's 15 dependent row steps."""
    SPLIT: tl.constexpr = 0 if LOW == 0 else 1  # mma's policies: 3xTF32, or hi + lo in LOW
    zero = tl.zeros(a.shape, tl.float32)
    x = tl.where(r == c, 1.0, 0.0) - tl.where((r == c + 1) & (r % 2 == 1), a, 0.0)
    for level in tl.static_range(1, 4):
        s = 1 << level
        low = tl.where(((r // (2 * s)) == (c // (2 * s))) & ((r // s) % 2 == 1) & ((c // s) % 2 == 0), a, 0.0)
        x = x - mma(x, mma(low, x, zero, False, False, SPLIT, LOW), zero, False, False, SPLIT, LOW)
    return x


@triton.jit
def load_tile(ptr, i, j, ROWS: tl.constexpr, COLS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Block (i, j), [BR, BC], of the row-major [ROWS, COLS] matrix at ptr; zeros outside it.
    Masks only where ROWS or COLS is not a multiple of its block."""
    r = i * BR + tl.arange(0, BR)
    c = j * BC + tl.arange(0, BC)
    off = r[:, None] * COLS + c[None, :]
    if ROWS % BR == 0 and COLS % BC == 0:
        return tl.load(ptr + off)
    else:
        return tl.load(ptr + off, mask=(r < ROWS)[:, None] & (c < COLS)[None, :], other=0.0)


@triton.jit
def store_tile(ptr, x, i, j, ROWS: tl.constexpr, COLS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Writes x into block (i, j) of the row-major [ROWS, COLS] matrix at ptr (what falls inside it)."""
    r = i * BR + tl.arange(0, BR)
    c = j * BC + tl.arange(0, BC)
    off = r[:, None] * COLS + c[None, :]
    if ROWS % BR == 0 and COLS % BC == 0:
        tl.store(ptr + off, x)
    else:
        tl.store(ptr + off, x, mask=(r < ROWS)[:, None] & (c < COLS)[None, :])


# Inputs (q, k, v, beta, dO) are read where the caller put them. LAYOUT says where that is:
# CHUNKS, the padded chunk layout [B, H, N, C, D]; TOKENS, the token layout [B, T, H, D]; PACKED,
# packed sequences [1, T, H, D], each split into chunks of its own, which a table [N, 2] of (first
# token, token count) places. Programs number chunks (b, h, n) row-major, and find a chunk's rows
# with `chunk_rows`; rows past a chunk's tokens are masked (loaded as zeros, exactly the zero padding
# of the chunk layout), so no padded copy of an input is ever made. Everything the kernels write stays
# in the chunk layout.
CHUNKS, TOKENS, PACKED = 0, 1, 2


@triton.jit
def chunk_rows(chunk, N, H, T, table_ptr, C: tl.constexpr, D: tl.constexpr, LAYOUT: tl.constexpr):
    """(offset of the chunk's first row, row stride, rows it has) of a D-wide input; `chunk` in int64.
    D = 1 for beta ([B, T, H] or [B, H, N, C])."""
    if LAYOUT == 1:  # TOKENS
        n = chunk % N
        bh = chunk // N
        return ((bh // H * T + n * C) * H + bh % H) * D, H * D, T - n * C
    elif LAYOUT == 2:  # PACKED (B = 1)
        n = chunk % N
        return (tl.load(table_ptr + 2 * n) * H + chunk // N) * D, H * D, tl.load(table_ptr + 2 * n + 1)
    else:
        return chunk * C * D, D, C


@triton.jit
def load_rows(ptr, stride, rows, i, j, COLS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Block (i, j), [BR, BC], of a chunk's rows at ptr (`stride` apart, `rows` of them, COLS wide);
    zeros past either."""
    r = i * BR + tl.arange(0, BR)
    c = j * BC + tl.arange(0, BC)
    return tl.load(ptr + r[:, None] * stride + c[None, :], mask=(r < rows)[:, None] & (c < COLS)[None, :], other=0.0)


@triton.jit
def store_rows(ptr, x, stride, rows, i, j, COLS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Writes x into block (i, j) of a chunk's rows at ptr (as load_rows places it), in ptr's dtype;
    nothing past `rows` or COLS."""
    r = i * BR + tl.arange(0, BR)
    c = j * BC + tl.arange(0, BC)
    tl.store(ptr + r[:, None] * stride + c[None, :], cast_for(x, ptr), mask=(r < rows)[:, None] & (c < COLS)[None, :])


@triton.jit
def _state_tile(ptr, i: tl.constexpr, iv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    if i * BK < K:
        return load_tile(ptr, i, iv, K, V, BK, BV).to(tl.float32)
    else:
        return tl.zeros([BK, BV], tl.float32)


@triton.jit
def put_state_tile(ptr, s, i: tl.constexpr, iv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr):
    if i * BK < K:
        store_tile(ptr, cast_for(s, ptr), i, iv, K, V, BK, BV)


# A state [K, V] (K <= 256) in a pass over chunks: value block iv as four [BK, BV] float32 tiles of
# rows [i BK, (i + 1) BK), those past K zero and never stored; stored in ptr's dtype.
@triton.jit
def load_state(ptr, iv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    return (_state_tile(ptr, 0, iv, K, V, BK, BV), _state_tile(ptr, 1, iv, K, V, BK, BV),
            _state_tile(ptr, 2, iv, K, V, BK, BV), _state_tile(ptr, 3, iv, K, V, BK, BV))


@triton.jit
def store_state(ptr, s0, s1, s2, s3, iv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    put_state_tile(ptr, s0, 0, iv, K, V, BK, BV)
    put_state_tile(ptr, s1, 1, iv, K, V, BK, BV)
    put_state_tile(ptr, s2, 2, iv, K, V, BK, BV)
    put_state_tile(ptr, s3, 3, iv, K, V, BK, BV)


@triton.jit
def load_column(ptr, stride, rows, C: tl.constexpr):
    """A chunk's C values of a one-wide input (beta) in float32; zeros past `rows`."""
    r = tl.arange(0, C)
    return tl.load(ptr + r * stride, mask=r < rows, other=0.0).to(tl.float32)

