"""Stage 3, `state pass`: the only sequential part, across chunks.

Forward, chunk n takes the state entering it, S_n [K, V], and gives
    V_new_n = U_n - W_n S_n,   S_{n+1} = S_n + K_n^T V_new_n.
Backward runs in reverse with dS_{n+1} (the gradient of the state leaving chunk n):
    dV_new_n = dV_local_n + K_n dS_{n+1},   dS_n = dS_{n+1} + scale Q_n^T dO_n - W_n^T dV_new_n,
where dV_local_n is the part of dV_new_n that comes from chunk n's own output.

`impl` picks how the steps run: "loop", a Python loop (eager; Dynamo would unroll it N times, one
graph per N), or "scan", torch's scan higher-order op, which traces one step so a single compiled
graph serves every sequence length.
"""

from __future__ import annotations

import torch
from torch._higher_order_ops.scan import scan

from .matmul import Dot

SCAN_IMPLS = ("loop", "scan")


def _run(step, carry, xs: tuple[torch.Tensor, ...], impl: str, reverse: bool):
    """Runs step(carry, x_n) -> (carry, y_n) over dim 2 of every xs [B, H, N, ...]; returns
    (final carry, ys stacked on dim 2)."""
    if impl == "scan":
        # Scanned over dim 0: torch 2.11's scan stacks its outputs there whatever `dim` says.
        # The carry's layout must match the step's output, so an expanded carry is made contiguous.
        final, ys = scan(step, carry.contiguous(), tuple(x.movedim(2, 0) for x in xs), dim=0, reverse=reverse)
        return final, tuple(y.movedim(0, 2) for y in ys)
    if impl != "loop":
        raise ValueError(f"impl must be one of {SCAN_IMPLS}, got {impl!r}")
    N = xs[0].shape[2]
    outs = []
    for n in reversed(range(N)) if reverse else range(N):
        carry, y = step(carry, tuple(x[:, :, n] for x in xs))
        outs.append(y)
    if reverse:
        outs.reverse()
    return carry, tuple(torch.stack(ys, dim=2) for ys in zip(*outs))


def state_pass(k, w, u, s0, *, dot: Dot, impl: str):
    """Returns (V_new [B, H, N, C, V], the state entering every chunk [B, H, N, K, V], final state)."""

    def step(s, x):
        k_n, w_n, u_n = x
        v_new = u_n - dot(w_n, s)
        return s + dot(k_n.transpose(-1, -2), v_new), (v_new, s.clone())

    final, (v_new, states) = _run(step, s0, (k, w, u), impl, reverse=False)
    return v_new, states, final


def state_pass_backward(q, k, w, do, dv_local, ds_final, scale: float, *, dot: Dot, impl: str):
    """Returns (dV_new [B, H, N, C, V], dS_{n+1} for every chunk [B, H, N, K, V], dS_0)."""

    def step(ds, x):
        q_n, k_n, w_n, do_n, dvl_n = x
        dv_new = dvl_n + dot(k_n, ds)
        ds_prev = ds + scale * dot(q_n.transpose(-1, -2), do_n) - dot(w_n.transpose(-1, -2), dv_new)
        return ds_prev, (dv_new, ds.clone())

    ds0, (dv_new, ds_next) = _run(step, ds_final, (q, k, w, do, dv_local), impl, reverse=True)
    return dv_new, ds_next, ds0
