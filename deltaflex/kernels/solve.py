"""Stage 1, `kkt + solve`, fused: T = (I + A)^-1 with A = tril(diag(beta) K K^T, -1), per chunk.

Forward (`solve_fwd_kernel`), one program per chunk, block forward substitution over 16-row blocks:
for block row i, A's rows [16, C] come from a float32-accumulated K_i K^T (A is never rounded to
bf16), the 16 x 16 diagonal block is inverted by doubling (`common.invert_unit_lower_16`, 3xTF32), and
    T_i,<i = -inv(I + A_ii) (A_i,<i T_<i,<i)
reads the rows of T already written by this program (a barrier orders each block row's stores
before the next one's loads). Block substitution and the doubling stay accurate with strongly
correlated keys, where power series in A do not (DESIGN.md).
Backward (`solve_bwd_kernel`): dA = tril(-T^T dT T^T, -1), then dbeta = rowsum(dA * K K^T) and
dK = (diag(beta) dA) K + (diag(beta) dA)^T K over BK-blocks of keys.

Layouts: k and beta are read in the chunk layout or the caller's token layout (common.chunk_rows);
everything written is in the chunk layout.

Grid: (B*H*N,). Blocks: 16-row blocks of the chunk (C / 16 of them, unrolled), the whole C x C
matrix as one tile, BK <= 64 over keys. Products of float32 factors (T, dT, A) run as 3xTF32
whatever the policy (near float32 accuracy on the tensor cores; see common.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import (FP32, block, check_tensors, chunk_rows, define_op, exact, f32, geometry, invert_unit_lower_16,
                     launch, launch_options, load_column, load_rows, load_tile, mma, mma_f32, policy_of, precision,
                     store_tile, warps_stages)


@triton.jit
def solve_chunk(k_c, k_stride, beta_c, beta_stride, n_rows, t_c, K: tl.constexpr, C: tl.constexpr,
                BK: tl.constexpr, K_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr):
    """Writes T = (I + A)^-1 of the chunk whose keys, betas (`n_rows` rows, common.chunk_rows) and T
    start at k_c, beta_c, t_c; on return every thread of the program sees all of T."""
    rc, r16 = tl.arange(0, C), tl.arange(0, 16)
    for i in tl.static_range(C // 16):
        rows = i * 16 + r16
        a = tl.zeros([16, C], tl.float32)  # rows of K K^T
        a_ii = tl.zeros([16, 16], tl.float32)  # its diagonal block
        for j in range(0, tl.cdiv(K, BK)):
            k_i = load_rows(k_c, k_stride, n_rows, i, j, K, 16, BK)
            a = mma(k_i, tl.trans(load_rows(k_c, k_stride, n_rows, 0, j, K, C, BK)), a, K_EXACT, K_EXACT, POLICY,
                    LOW)
            a_ii = mma(k_i, tl.trans(k_i), a_ii, K_EXACT, K_EXACT, POLICY, LOW)
        beta = tl.load(beta_c + rows * beta_stride, mask=rows < n_rows, other=0.0).to(tl.float32)
        a = tl.where(rc[None, :] < rows[:, None], a * beta[:, None], 0.0)
        x = invert_unit_lower_16(tl.where(r16[None, :] < r16[:, None], a_ii * beta[:, None], 0.0), r16[:, None],
                                 r16[None, :], 0)
        if i > 0:
            # T's block rows < i, written by earlier iterations (read past L1: .cg); later rows as zeros
            t_prev = tl.load(t_c + rc[:, None] * C + rc[None, :], mask=(rc < i * 16)[:, None], other=0.0,
                             cache_modifier=".cg")
            p = mma_f32(a, t_prev, tl.zeros([16, C], tl.float32))
            off = -mma_f32(x, p, tl.zeros([16, C], tl.float32))
            tl.store(t_c + rows[:, None] * C + rc[None, :], off, mask=(rc < i * 16)[None, :])
        store_tile(t_c, x, i, i, C, C, 16, 16)
        if i < C // 16 - 1:
            tl.store(t_c + rows[:, None] * C + rc[None, :], tl.zeros([16, C], tl.float32),
                     mask=(rc >= (i + 1) * 16)[None, :])
        tl.debug_barrier()


@triton.jit
def solve_fwd_kernel(k_ptr, beta_ptr, t_ptr, N, H, T, table_ptr,
                     K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                     K_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr, LAYOUT: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    k_off, k_stride, n_rows = chunk_rows(chunk, N, H, T, table_ptr, C, K, LAYOUT)
    beta_off, beta_stride, _ = chunk_rows(chunk, N, H, T, table_ptr, C, 1, LAYOUT)
    solve_chunk(k_ptr + k_off, k_stride, beta_ptr + beta_off, beta_stride, n_rows, t_ptr + chunk * C * C, K, C, BK,
                K_EXACT, POLICY, LOW)


@triton.jit
def solve_bwd_kernel(k_ptr, beta_ptr, t_ptr, dt_ptr, dk_ptr, dbeta_ptr, N, H, T, table_ptr,
                     K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                     K_EXACT: tl.constexpr, POLICY: tl.constexpr, LOW: tl.constexpr, LAYOUT: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    k_off, k_stride, n_rows = chunk_rows(chunk, N, H, T, table_ptr, C, K, LAYOUT)
    beta_off, beta_stride, _ = chunk_rows(chunk, N, H, T, table_ptr, C, 1, LAYOUT)
    k_c = k_ptr + k_off
    rc = tl.arange(0, C)
    t = load_tile(t_ptr + chunk * C * C, 0, 0, C, C, C, C)
    m = mma_f32(tl.trans(t), load_tile(dt_ptr + chunk * C * C, 0, 0, C, C, C, C), tl.zeros([C, C], tl.float32))
    da = -mma_f32(m, tl.trans(t), tl.zeros([C, C], tl.float32))
    da = tl.where(rc[:, None] > rc[None, :], da, 0.0)
    kkt = tl.zeros([C, C], tl.float32)
    for j in range(0, tl.cdiv(K, BK)):
        k = load_rows(k_c, k_stride, n_rows, 0, j, K, C, BK)
        kkt = mma(k, tl.trans(k), kkt, K_EXACT, K_EXACT, POLICY, LOW)
    tl.store(dbeta_ptr + chunk * C + rc, tl.sum(da * kkt, 1))
    dab = load_column(beta_ptr + beta_off, beta_stride, n_rows, C)[:, None] * da
    for j in range(0, tl.cdiv(K, BK)):
        k = load_rows(k_c, k_stride, n_rows, 0, j, K, C, BK)
        dk = mma(dab, k, mma(tl.trans(dab), k, tl.zeros([C, BK], tl.float32), False, K_EXACT, POLICY, LOW),
                 False, K_EXACT, POLICY, LOW)
        store_tile(dk_ptr + chunk * C * K, dk, 0, j, C, K, C, BK)


def _solve_fwd_fake(k, beta, policy, low, num_warps=0, num_stages=0, chunk_size=0, chunk_table=None):
    B, H, N, C = geometry(k, chunk_size, chunk_table)[:4]
    return f32(B, H, N, C, C, like=k)


@define_op("solve_fwd", _solve_fwd_fake)
def solve_fwd(k: torch.Tensor, beta: torch.Tensor, policy: str, low: torch.dtype, num_warps: int = 0,
              num_stages: int = 0, chunk_size: int = 0, chunk_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """k, beta in the chunk layout, or (chunk_size > 0) in the token layout (common.chunk_rows)."""
    g, K = geometry(k, chunk_size, chunk_table), k.shape[-1]
    t = _solve_fwd_fake(k, beta, policy, low, chunk_size=chunk_size, chunk_table=chunk_table)
    POLICY, LOW = precision(policy, low)
    launch(solve_fwd_kernel, (g.B * g.H * g.N,), k, beta, t, *g.kernel_args(), K=K, C=g.C, BK=block(K),
           K_EXACT=exact(k, low), POLICY=POLICY, LOW=LOW, LAYOUT=g.layout,
           num_warps=num_warps or (4 if g.C <= 64 else 8), num_stages=num_stages or 1)
    return t


# NARROW_KEYS_FAULT: on the H200 (Triton 3.6, sm_90), solve_bwd_kernel under a bf16 policy with
# chunks of 64 or 128 rows and key blocks narrower than 64 is miscompiled. With 8 warps it reads
# shared memory out of bounds (compute-sanitizer: a 512-byte __shared__ read past the end in a
# product of bf16 tiles; C=64 with K=16 or 32 and C=128 with K=32 fault, K=48 and 64 run clean);
# with 4 warps it runs but dk is wrong (relative error 17 at C=64, K=32). Its float32 build (3xTF32
# products, 8 warps) is right at both chunk sizes (test_stages_at_every_shape[fp32-...] on the
# H200), so those launches take it: more accurate, and at head dims up to 32 its cost is small.


def _solve_bwd_fake(k, beta, t, dt, policy, low, num_warps=0, num_stages=0, chunk_size=0, chunk_table=None):
    B, H, N, C = geometry(k, chunk_size, chunk_table)[:4]
    return f32(B, H, N, C, k.shape[-1], like=k), f32(B, H, N, C, like=k)


@define_op("solve_bwd", _solve_bwd_fake)
def solve_bwd(k: torch.Tensor, beta: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, policy: str,
              low: torch.dtype, num_warps: int = 0, num_stages: int = 0, chunk_size: int = 0,
              chunk_table: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """k, beta in either layout (as solve_fwd); t, dt, and dk, dbeta in the chunk layout."""
    g, K = geometry(k, chunk_size, chunk_table), k.shape[-1]
    dk, dbeta = _solve_bwd_fake(k, beta, t, dt, policy, low, chunk_size=chunk_size, chunk_table=chunk_table)
    POLICY, LOW = precision(policy, low)
    BK = block(K)
    num_warps = num_warps or (4 if g.C <= 32 else 8)
    if g.C >= 64 and BK < 64 and POLICY != FP32:  # NARROW_KEYS_FAULT
        POLICY, num_warps, num_stages = FP32, 8, 0
    launch(solve_bwd_kernel, (g.B * g.H * g.N,), k, beta, t, dt, dk, dbeta, *g.kernel_args(), K=K, C=g.C, BK=BK,
           K_EXACT=exact(k, low), POLICY=POLICY, LOW=LOW, LAYOUT=g.layout, **launch_options(num_warps, num_stages))
    return dk, dbeta


def solve_forward(k, beta, dot, config=None, chunk_size=0, chunk_table=None):
    """The registered `solve` stage: T [B, H, N, C, C], float32. chunk_size > 0: k and beta are in
    the token layout (deltaflex.kernels says when)."""
    check_tensors(k, beta)
    policy, low = policy_of(dot)
    return solve_fwd(k.contiguous(), beta.contiguous(), policy, low, *warps_stages(config), chunk_size, chunk_table)


def solve_backward(k, beta, t, dt, dot, config=None, chunk_size=0, chunk_table=None):
    """The registered `solve_backward` stage: (dk, dbeta), float32, in the chunk layout."""
    check_tensors(k, beta, t, dt)
    policy, low = policy_of(dot)
    return solve_bwd(k.contiguous(), beta.contiguous(), t.contiguous(), dt.contiguous(), policy, low,
                     *warps_stages(config), chunk_size, chunk_table)
