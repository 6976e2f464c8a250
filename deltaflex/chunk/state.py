"""Stage 3, `state pass`: the only sequential part, across chunks.

Forward, chunk n takes the state entering it, S_n [K, V], and gives
    V_new_n = U_n - W_n S_n,   S_{n+1} = S_n + K_n^T V_new_n.
Backward runs in reverse with dS_{n+1} (the gradient of the state leaving chunk n):
    dV_new_n = dV_local_n + K_n dS_{n+1},   dS_n = dS_{n+1} + scale Q_n^T dO_n - W_n^T dV_new_n,
where dV_local_n is the part of dV_new_n that comes from chunk n's own output.

Only what must be sequential runs step by step: each step is two or three fused multiply-adds
(`dot_add`), and its only output is V_new_n (dV_new_n). The per-chunk states are then rebuilt in
parallel from those outputs by a cumulative sum over chunks, since step count, not work, is what a
step costs on a GPU.

`impl` picks how the steps run: "loop", a Python loop (eager; Dynamo would unroll it N times, one
graph per N), or "scan", torch's scan higher-order op, which traces one step so a single compiled
graph serves every sequence length.
"""

from __future__ import annotations

import torch
from torch._higher_order_ops.scan import scan

from .matmul import Dot, dot_add, is_plain

SCAN_IMPLS = ("loop", "scan")


def _run(step, carry, xs: tuple[torch.Tensor, ...], impl: str, reverse: bool):
    """Runs step(carry, x_n) -> (carry, y_n) over dim 2 of every xs [B, H, N, ...]; returns
    (final carry, y stacked on dim 2)."""
    if impl == "scan":
        # Scanned over dim 0: torch 2.11's scan stacks its outputs there whatever `dim` says.
        # The carry's layout must match the step's output, so an expanded carry is made contiguous.
        final, ys = scan(step, carry.contiguous(), tuple(x.movedim(2, 0) for x in xs), dim=0, reverse=reverse)
        return final, ys.movedim(0, 2)
    if impl != "loop":
        raise ValueError(f"impl must be one of {SCAN_IMPLS}, got {impl!r}")
    N = xs[0].shape[2]
    outs = []
    for n in reversed(range(N)) if reverse else range(N):
        carry, y = step(carry, tuple(x[:, :, n] for x in xs))
        outs.append(y)
    if reverse:
        outs.reverse()
    return carry, torch.stack(outs, dim=2)


def _exclusive_cumsum(x: torch.Tensor, dim: int, reverse: bool = False) -> torch.Tensor:
    if reverse:
        x = x.flip(dim)
    out = x.cumsum(dim) - x
    return out.flip(dim) if reverse else out


def _operands(dot: Dot, state_dtype: torch.dtype, *xs: torch.Tensor):
    # A plain (float32) policy multiplies in the state dtype: cast once here, not once a step.
    return tuple(x.to(state_dtype) for x in xs) if is_plain(dot) else xs


def state_pass(k, w, u, s0, *, dot: Dot, impl: str):
    """Returns (V_new [B, H, N, C, V], the state entering every chunk [B, H, N, K, V], final state)."""
    k, w, u = _operands(dot, s0.dtype, k, w, u)

    def step(s, x):
        k_n, w_n, u_n = x
        v_new = dot_add(u_n, w_n, s, dot, alpha=-1.0)
        return dot_add(s, k_n.transpose(-1, -2), v_new, dot), v_new

    final, v_new = _run(step, s0, (k, w, u), impl, reverse=False)
    increments = dot(k.transpose(-1, -2), v_new)  # K_n^T V_new_n, every chunk at once
    return v_new, s0.unsqueeze(2) + _exclusive_cumsum(increments, dim=2), final


def state_pass_backward(q, k, w, do, dv_local, ds_final, scale: float, *, dot: Dot, impl: str):
    """Returns (dV_new [B, H, N, C, V], dS_{n+1} for every chunk [B, H, N, K, V], dS_0)."""
    q, k, w, do = _operands(dot, ds_final.dtype, q, k, w, do)
    g = scale * dot(q.transpose(-1, -2), do)  # the part of dS_n from chunk n's own output

    def step(ds, x):
        k_n, w_n, g_n, dvl_n = x
        dv_new = dot_add(dvl_n, k_n, ds, dot)
        return ds + dot_add(g_n, w_n.transpose(-1, -2), dv_new, dot, alpha=-1.0), dv_new

    ds0, dv_new = _run(step, ds_final, (k, w, g, dv_local), impl, reverse=True)
    increments = g - dot(w.transpose(-1, -2), dv_new)  # dS_n - dS_{n+1}, every chunk at once
    return dv_new, ds_final.unsqueeze(2) + _exclusive_cumsum(increments, dim=2, reverse=True), ds0
