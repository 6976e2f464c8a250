"""Matrix products under a precision policy: where the tensor cores come in.

Chunk math accumulates in float32 (float64 for float64 inputs). Operands that are inputs (q, k, v,
do in bf16/fp16) are exact in their own dtype; float32 intermediates (T, W, U, states) are not, and
the policy says what happens to them before a bf16/fp16 tensor-core product:

- "fp32":   float32 products throughout (CUDA cores on GPUs: accurate, slow);
- "bf16x3": an inexact operand x is split into hi = low(x) and lo = low(x - hi), and the product is
            a_hi b_hi + a_hi b_lo + a_lo b_hi, one GEMM over a 3x longer inner dimension (about
            float32 accuracy on the tensor cores);
- "bf16":   inexact operands are rounded to the low dtype once (fla's choice; fastest).

`low` is the inputs' dtype (bf16 or fp16). Products always return float32 (float64).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

Dot = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
POLICIES = ("fp32", "bf16x3", "bf16")


def _product_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of two low-precision operands, accumulated in and returned as float32."""
    if a.is_cuda:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
        b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
        return torch.bmm(a3, b3, out_dtype=torch.float32).reshape(*batch, a.shape[-2], b.shape[-1])
    # CPUs have no mixed-dtype GEMM; float32 on exact low-precision values gives the same products.
    return a.float() @ b.float()


def _split(x: torch.Tensor, low: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    hi = x.to(low)
    return hi, (x - hi.float()).to(low)


def dot(a: torch.Tensor, b: torch.Tensor, policy: str, low: torch.dtype) -> torch.Tensor:
    """a @ b in float32 (float64 if either operand is) under `policy`; operands already in `low`
    are taken as exact."""
    if torch.float64 in (a.dtype, b.dtype):
        return a.double() @ b.double()
    if policy == "fp32" or low == torch.float32:
        return a.float() @ b.float()
    a_exact, b_exact = a.dtype == low, b.dtype == low
    if policy == "bf16" or (a_exact and b_exact):
        return _product_f32(a.to(low), b.to(low))
    if a_exact:
        b_hi, b_lo = _split(b, low)
        return _product_f32(torch.cat([a, a], -1), torch.cat([b_hi, b_lo], -2))
    a_hi, a_lo = _split(a, low)
    if b_exact:
        return _product_f32(torch.cat([a_hi, a_lo], -1), torch.cat([b, b], -2))
    b_hi, b_lo = _split(b, low)
    return _product_f32(torch.cat([a_hi, a_hi, a_lo], -1), torch.cat([b_hi, b_lo, b_hi], -2))


def make_dot(policy: str, low: torch.dtype) -> Dot:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    return functools.partial(dot, policy=policy, low=low)


def is_plain(dot: Dot) -> bool:
    """Whether `dot` multiplies in the state dtype as it is (policy fp32, or fp32/fp64 inputs)."""
    return dot.keywords["policy"] == "fp32" or dot.keywords["low"] in (torch.float32, torch.float64)


def _batched(x: torch.Tensor, batch: torch.Size) -> torch.Tensor:
    return x.expand(*batch, *x.shape[-2:]).reshape(-1, *x.shape[-2:])


def dot_add(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dot: Dot, alpha: float = 1.0,
            beta: float = 1.0) -> torch.Tensor:
    """beta * c + alpha * (a @ b), one fused baddbmm when `dot` is plain and a, b already have c's
    dtype (on a CPU every separate pass over a [B, H, N, C, D] tensor costs about as much as a third of
    a chunk product)."""
    if is_plain(dot) and a.dtype == b.dtype == c.dtype:
        if a.dim() == b.dim() == c.dim() == 3 and a.shape[0] == b.shape[0] == c.shape[0]:
            return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)
        batch = c.shape[:-2]
        return torch.baddbmm(c.reshape(-1, *c.shape[-2:]), _batched(a, batch), _batched(b, batch), beta=beta,
                             alpha=alpha).reshape(c.shape)
    out = dot(a, b) if alpha == 1.0 else alpha * dot(a, b)
    return out + (c if beta == 1.0 else beta * c)


def scaled_dot(a: torch.Tensor, b: torch.Tensor, dot: Dot, alpha: float) -> torch.Tensor:
    """alpha * (a @ b), the scaling done inside the product when `dot` is plain and a, b share a dtype."""
    if is_plain(dot) and a.dtype == b.dtype and a.dtype in (torch.float32, torch.float64):
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        out = torch.baddbmm(a.new_zeros(()).expand(1, 1, 1), _batched(a, batch), _batched(b, batch), beta=0.0,
                            alpha=alpha)
        return out.reshape(*batch, a.shape[-2], b.shape[-1])
    return alpha * dot(a, b)
