"""Stage 3, `state pass`: the only sequential part, across chunks.

Each chunk n maps the state entering it, S_n [K, V], to the next one by an affine map
    S_{n+1} = S_n - P_n S_n + R_n,   P_n = K_n^T W_n [K, K],   R_n = K_n^T U_n [K, V],
and the backward pass runs the transposed map in reverse order,
    dS_n = dS_{n+1} - P_n^T dS_{n+1} + G_n.
Both are `affine_scan`. Its `impl` picks how the steps run: `"loop"`, a Python loop (eager; Dynamo
would unroll it N times), or `"scan"`, torch's scan higher-order op, which traces the step once so
one compiled graph serves every sequence length.
"""

from __future__ import annotations

import torch
from torch._higher_order_ops.scan import scan

SCAN_IMPLS = ("loop", "scan")


def chunk_transitions(k: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """P = K^T W and R = K^T U per chunk: k, w [..., C, K], u [..., C, V] -> [..., K, K], [..., K, V]."""
    kt = k.transpose(-1, -2)
    return kt @ w, kt @ u


def _affine_step(transpose: bool):
    def step(x, pr):
        p, r = pr
        if transpose:
            p = p.transpose(-1, -2)
        return x - p @ x + r, x.clone()

    return step


def affine_scan(
    p: torch.Tensor,
    r: torch.Tensor,
    x0: torch.Tensor,
    *,
    reverse: bool = False,
    transpose: bool = False,
    impl: str = "loop",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs x <- x - op(p_n) x + r_n over n (dim 2 of p [B, H, N, K, K] and r [B, H, N, K, V]),
    op(p) = p^T if `transpose`, from the last step to the first if `reverse`.

    Returns (the x entering every step [B, H, N, K, V], the final x [B, H, K, V]).
    """
    step = _affine_step(transpose)
    if impl == "scan":
        # Scanned over dim 0: torch 2.11's scan stacks its outputs there whatever `dim` says.
        # The carry's layout must match the step's output, so an expanded x0 is made contiguous.
        xs = (p.movedim(2, 0), r.movedim(2, 0))
        final, entering = scan(step, x0.contiguous(), xs, dim=0, reverse=reverse)
        return entering.movedim(0, 2), final
    if impl != "loop":
        raise ValueError(f"impl must be one of {SCAN_IMPLS}, got {impl!r}")
    N = p.shape[2]
    order = range(N - 1, -1, -1) if reverse else range(N)
    x, entering = x0, [None] * N
    for n in order:
        x, entering[n] = step(x, (p[:, :, n], r[:, :, n]))
    return torch.stack(entering, dim=2), x
