"""Stage 1, `kkt + solve`: A = tril(diag(beta) K K^T, -1) and T = (I + A)^-1 per chunk.

A is built in float32 from the exact input keys (rounding A to bf16 would already cost ~1e-2).
The inverse is recursive block inversion,
    inv([[L11, 0], [L21, L22]]) = [[X11, 0], [-X22 L21 X11, X22]],
run bottom-up: all 1x1 diagonal blocks, then 2x2, ... up to C x C, each level one pair of batched
float32 matmuls over every block of every chunk. It needs no per-row loop and stays accurate when
keys are strongly correlated, where the loop-free product prod_m (I + (-A)^(2^m)) loses all
precision (powers of A grow like binomial coefficients; see DESIGN.md). On a CPU the inverse is
LAPACK's triangular solve instead (forward substitution, as accurate): there the inversion's many
small products cost 2-3x more than one batched solve.
"""

from __future__ import annotations

import torch

from .matmul import Dot, dot_add, is_plain, make_dot, scaled_dot

_PLAIN = {dtype: make_dot("fp32", dtype) for dtype in (torch.float32, torch.float64)}


def kkt(k: torch.Tensor, beta: torch.Tensor, dot: Dot) -> torch.Tensor:
    """A = tril(diag(beta) K K^T, -1); k [..., C, K], beta [..., C] -> [..., C, C]."""
    return dot(k, k.transpose(-1, -2)).mul_(beta[..., None]).tril_(-1)


def _diagonal_pairs(a: torch.Tensor, b: int) -> torch.Tensor:
    """The lower-left b x b block of every 2b x 2b diagonal block of a [..., C, C] -> [..., C/2b, b, b]."""
    C = a.shape[-1]
    nb = C // (2 * b)
    blocks = a.reshape(*a.shape[:-2], nb, 2, b, nb, 2, b)
    diag = torch.diagonal(blocks, dim1=-6, dim2=-3)  # [..., 2, b, 2, b, nb]
    return diag[..., 1, :, 0, :, :].movedim(-1, -3)


def solve_unit_lower(a: torch.Tensor) -> torch.Tensor:
    """(I + A)^-1 for strictly lower triangular a [..., C, C], C a power of two: a batched
    triangular solve on the CPU, recursive block inversion elsewhere."""
    if a.device.type == "cpu":
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        return torch.linalg.solve_triangular(a, eye.expand_as(a), upper=False, unitriangular=True)
    return invert_unit_lower_blocks(a)


def invert_unit_lower_blocks(a: torch.Tensor) -> torch.Tensor:
    """(I + A)^-1 for strictly lower triangular a [..., C, C], C a power of two, by recursive block
    inversion."""
    C = a.shape[-1]
    inv = a.new_ones(*a.shape[:-2], C, 1, 1)  # inverses of the 1x1 diagonal blocks
    b = 1
    while b < C:
        x11, x22 = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        x21 = -(x22 @ _diagonal_pairs(a, b)) @ x11
        top = torch.cat([x11, torch.zeros_like(x11)], dim=-1)
        inv = torch.cat([top, torch.cat([x21, x22], dim=-1)], dim=-2)
        b *= 2
    return inv.squeeze(-3)


def solve_unit_lower_backward(t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the strictly lower A of T = (I + A)^-1: tril(-T^T dT T^T, -1)."""
    tt = t.transpose(-1, -2)
    return torch.matmul(scaled_dot(tt, dt, dot=_PLAIN[t.dtype], alpha=-1.0), tt).tril_(-1)


def kkt_backward(k: torch.Tensor, beta: torch.Tensor, da: torch.Tensor, dot: Dot) -> tuple[torch.Tensor, torch.Tensor]:
    """(dk, dbeta) of A = tril(diag(beta) K K^T, -1), given a strictly lower da."""
    da_beta = beta[..., None] * da
    if is_plain(dot):
        # With M = dA K: dbeta_i = k_i . M_i and dk = beta M + (beta dA)^T K (no K K^T to rebuild).
        m = dot(da, k)
        return dot_add(beta[..., None] * m, da_beta.transpose(-1, -2), k, dot), (m * k).sum(-1)
    # bf16 policies: K K^T of exact operands, not a product of a rounded dA (as the kernels do)
    dbeta = (da * dot(k, k.transpose(-1, -2))).sum(-1)
    return dot(da_beta, k) + dot(da_beta.transpose(-1, -2), k), dbeta
