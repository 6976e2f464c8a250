"""Stage 3, `state pass`: the only sequential part, across chunks.

Forward, chunk n takes the state entering it, S_n [K, V], and gives
    V_new_n = U_n - W_n S_n,   S_{n+1} = S_n + K_n^T V_new_n.
Backward runs in reverse with dS_{n+1} (the gradient of the state leaving chunk n):
    dV_new_n = dV_local_n + K_n dS_{n+1},   dS_n = dS_{n+1} + scale Q_n^T dO_n - W_n^T dV_new_n,
where dV_local_n is the part of dV_new_n that comes from chunk n's own output.

Only what must be sequential runs step by step: each step is two fused multiply-adds (`dot_add`).
On a GPU a scanned step's only output is V_new_n (dV_new_n) and the per-chunk states are rebuilt
afterwards, in parallel, by a cumulative sum over chunks; a Python loop, and a scan on a CPU, hand
out the states they carry instead (the rebuild's product and cumulative sum cost more than the
forward's solve on a CPU, and compiled, each is a C++ kernel of its own to build).
On a GPU a step costs its kernel launches, not its work, so `Stepping.group` = m > 1 cuts the
number of steps from N to m + N/m with a two-level pass: the m chunks of every state chunk are
first combined (from a zero state, in parallel over state chunks) into the state chunk's own WY
factors, then one pass runs over the N/m state chunks.

`Stepping.kind` picks how steps run: "loop", a Python loop (eager; Dynamo would unroll it, one
graph per N), or "scan", torch's scan higher-order op, which traces one step so one compiled graph
serves every N (N must then be an input size of the graph: see function.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch._higher_order_ops.scan import scan
from torch.utils._pytree import tree_map

from .layout import Segments
from .matmul import Dot, dot_add, is_plain, scaled_dot

KINDS = ("loop", "scan")


class Stepping(NamedTuple):
    kind: str = "loop"  # "loop" or "scan"
    group: int = 1  # chunks per state chunk of the two-level pass; 1: a single pass over chunks


def _run(step, carry, xs: tuple[torch.Tensor, ...], kind: str, dim: int, reverse: bool = False):
    """Runs step(carry, x_n) -> (carry, y_n) over `dim` of every xs; returns (final carry, y stacked
    on `dim`)."""
    if kind == "scan":
        # Scanned over dim 0: torch 2.11's scan stacks its outputs there whatever `dim` says.
        # The carry's layout must match the step's output, so an expanded carry is made contiguous.
        # On a CPU the stacked outputs are copied once into the layout their consumers read: left as
        # permuted views, every product reading one makes its own copy (a C++ kernel each, compiled).
        final, ys = scan(step, carry.contiguous(), tuple(x.movedim(dim, 0) for x in xs), dim=0, reverse=reverse)
        return final, tree_map(lambda y: y.movedim(0, dim).contiguous() if y.is_cpu else y.movedim(0, dim), ys)
    if kind != "loop":
        raise ValueError(f"stepping kind must be one of {KINDS}, got {kind!r}")
    # The batch dims before `dim` merged into one, so a step's products are plain 3-d baddbmm calls:
    # at small sizes a step costs its Python and dispatch overhead, not its arithmetic.
    batch = carry.shape[:dim]
    if dim > 1 and all(x.shape[:dim] in (batch, (1,) * dim) for x in xs):
        final, ys = _run(step, carry.flatten(0, dim - 1), tuple(x.flatten(0, dim - 1) for x in xs), kind, 1, reverse)
        return final.unflatten(0, batch), tree_map(lambda y: y.unflatten(0, batch), ys)
    outs = []
    slices = list(zip(*(x.unbind(dim) for x in xs)))
    for x_n in reversed(slices) if reverse else slices:
        carry, y = step(carry, x_n)
        outs.append(y)
    if reverse:
        outs.reverse()
    if isinstance(outs[0], tuple):
        return carry, tuple(torch.stack(ys, dim=dim) for ys in zip(*outs))
    return carry, torch.stack(outs, dim=dim)


def _exclusive_cumsum(x: torch.Tensor, dim: int, reverse: bool = False) -> torch.Tensor:
    if reverse:
        x = x.flip(dim)
    out = x.cumsum(dim) - x
    return out.flip(dim) if reverse else out


def _operands(dot: Dot, state_dtype: torch.dtype, *xs: torch.Tensor):
    # A plain (float32) policy multiplies in the state dtype: cast once here, not once a step.
    return tuple(x.to(state_dtype) for x in xs) if is_plain(dot) else xs


def _check_group(N: int, group: int) -> None:
    if group < 1 or (isinstance(N, int) and N % group):
        raise ValueError(f"a two-level state pass needs the chunk count ({N}) to be a multiple of group={group}")


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, H, N, C, D] -> [B, H, N/m, m, C, D]."""
    B, H, N = x.shape[:3]
    return x.reshape(B, H, N // group, group, *x.shape[3:])


def _state_chunks(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N/m, m, C, D] -> [B, H, N/m, m C, D]."""
    return x.reshape(*x.shape[:3], x.shape[3] * x.shape[4], x.shape[5])


def _own(carry: torch.Tensor, kind: str) -> torch.Tensor:
    """A step's carry handed out as an output: a scanned step's outputs may not alias its inputs."""
    return carry.clone() if kind == "scan" else carry


def _forward_steps(k, w, u, s0, dot: Dot, kind: str, dim: int, with_states: bool = False):
    """Returns (V_new, final state), and the state entering every step where `with_states`."""

    def step(s, x):
        k_n, w_n, u_n = x
        v_new = dot_add(u_n, w_n, s, dot, alpha=-1.0)
        return dot_add(s, k_n.transpose(-1, -2), v_new, dot), ((v_new, _own(s, kind)) if with_states else v_new)

    final, ys = _run(step, s0, (k, w, u), kind, dim)
    return (*ys, final) if with_states else (ys, final)


def _backward_steps(k, w, g, x, ds_end, dot: Dot, kind: str, dim: int, with_states: bool = False):
    """Returns (dV_new, dS_0), and the gradient entering every (reverse) step, dS_{n+1}, where
    `with_states`."""

    def step(ds, xs):
        k_n, w_n, g_n, x_n = xs
        e = dot_add(x_n, k_n, ds, dot)
        return ds + dot_add(g_n, w_n.transpose(-1, -2), e, dot, alpha=-1.0), ((e, _own(ds, kind)) if with_states else e)

    ds_start, ys = _run(step, ds_end, (k, w, g, x), kind, dim, reverse=True)
    return (*ys, ds_start) if with_states else (ys, ds_start)


def _state_chunk_wy(k, w, u, dot: Dot, impl: Stepping):
    """(K, W, U) of the state chunks of g = impl.group chunks each, [B, H, N/g, g C, D]: inside each
    state chunk, the forward steps from a zero state with values [W | U] give its WY factors."""
    m = impl.group
    _check_group(k.shape[2], m)
    B, H, N, C, K = k.shape
    z0 = w.new_zeros(B, H, N // m, K, K + u.shape[-1])
    wu, _ = _forward_steps(*(_grouped(x, m) for x in (k, w, torch.cat([w, u], -1))), z0, dot, impl.kind, dim=3)
    return tuple(_state_chunks(x) for x in (_grouped(k, m), wu[..., :K], wu[..., K:]))


def _state_chunk_responses(k, w, g, dv_local, dot: Dot, impl: Stepping):
    """Inside each state chunk, the backward steps from dS_end = [0 | I]: for the state chunk's true
    end gradient D, dV_new_j = E_j + F_j D and dS_start = G_L + M_L D. Returns ([E | F] per chunk
    [B, H, N/g, g, C, V + K], [G_L | M_L] per state chunk [B, H, N/g, K, V + K])."""
    m = impl.group
    _check_group(k.shape[2], m)
    B, H, N, C, K = k.shape
    V = dv_local.shape[-1]
    x = torch.cat([dv_local, dv_local.new_zeros(B, H, N, C, K)], -1)
    g_wide = torch.cat([g, g.new_zeros(B, H, N, K, K)], -1)
    eye = torch.eye(K, dtype=g.dtype, device=g.device).expand(B, H, N // m, K, K)
    end = torch.cat([g.new_zeros(B, H, N // m, K, V), eye], -1)
    return _backward_steps(*(_grouped(t, m) for t in (k, w, g_wide, x)), end, dot, impl.kind, dim=3)


def _states_out(impl: Stepping, k: torch.Tensor) -> bool:
    """Whether a one-level pass hands out the states its steps carry rather than rebuilding them:
    always when looping, and when scanning on a CPU, where a scanned step's outputs are copied in
    the step's own kernel and the rebuild's product, cumulative sum and (backward) flips cost both
    run time and, compiled, C++ kernels of their own."""
    return impl.kind == "loop" or k.device.type == "cpu"


def state_pass(k, w, u, s0, *, dot: Dot, impl: Stepping, segments: Segments | None = None):
    """Returns (V_new [B, H, N, C, V], the state entering every chunk [B, H, N, K, V], final state).

    With `segments` (packed sequences, B = 1), s0 and the final state are [S, H, K, V]."""
    k, w, u = _operands(dot, s0.dtype, k, w, u)
    if segments is not None:
        return _segmented_state_pass(k, w, u, s0, dot, impl, segments)
    m = impl.group
    if m == 1 and _states_out(impl, k):
        return _forward_steps(k, w, u, s0, dot, impl.kind, dim=2, with_states=True)
    if m == 1:
        v_new, final = _forward_steps(k, w, u, s0, dot, impl.kind, dim=2)
    else:
        v_new, final = _forward_steps(*_state_chunk_wy(k, w, u, dot, impl), s0, dot, impl.kind, dim=2)
        v_new = v_new.reshape(u.shape)
    increments = dot(k.transpose(-1, -2), v_new)  # K_n^T V_new_n, every chunk at once
    return v_new, s0.unsqueeze(2) + _exclusive_cumsum(increments, dim=2), final


def state_pass_backward(
    q, k, w, do, dv_local, ds_final, scale: float, *, dot: Dot, impl: Stepping, segments: Segments | None = None
):
    """Returns (dV_new [B, H, N, C, V], dS_{n+1} for every chunk [B, H, N, K, V], dS_0).

    With `segments` (packed sequences, B = 1), ds_final and dS_0 are [S, H, K, V]."""
    q, k, w, do = _operands(dot, ds_final.dtype, q, k, w, do)
    g = scaled_dot(q.transpose(-1, -2), do, dot, scale)  # the part of dS_n from chunk n's own output
    if segments is not None:
        return _segmented_state_pass_backward(k, w, g, dv_local, ds_final, dot, impl, segments)
    m = impl.group
    if m == 1 and _states_out(impl, k):
        return _backward_steps(k, w, g, dv_local, ds_final, dot, impl.kind, dim=2, with_states=True)
    if m == 1:
        dv_new, ds0 = _backward_steps(k, w, g, dv_local, ds_final, dot, impl.kind, dim=2)
    else:
        dv_new, ds0 = _two_level_backward(k, w, g, dv_local, ds_final, dot, impl)
    increments = g - dot(w.transpose(-1, -2), dv_new)  # dS_n - dS_{n+1}, every chunk at once
    return dv_new, ds_final.unsqueeze(2) + _exclusive_cumsum(increments, dim=2, reverse=True), ds0


def _two_level_backward(k, w, g, dv_local, ds_final, dot: Dot, impl: Stepping):
    """The state chunks' responses, then one reverse pass over state chunks gives every state
    chunk's end gradient D, and dV_new follows in parallel."""
    V = dv_local.shape[-1]
    e, start = _state_chunk_responses(k, w, g, dv_local, dot, impl)

    def step(d, xs):
        g_l, m_l = xs
        return dot_add(g_l, m_l, d, dot), d.clone()

    ds0, d_end = _run(step, ds_final, (start[..., :V], start[..., V:]), impl.kind, dim=2, reverse=True)
    dv_new = e[..., :V] + dot(e[..., V:], d_end.unsqueeze(3))
    return dv_new.reshape(dv_local.shape), ds0


# Packed sequences. The sequential passes restart at sequence boundaries, so states are carried out
# of the steps rather than rebuilt by a cumulative sum over all chunks (which would subtract large
# sums across sequences); with a two-level pass, only across state chunks.


def _per_chunk(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [S, H, ...] gathered at index [N] -> [1, H, N, ...]."""
    return x[index].movedim(0, 1).unsqueeze(0)


def _flag(flags: torch.Tensor) -> torch.Tensor:
    """[N] bool -> [1, 1, N, 1, 1], to broadcast against chunk states."""
    return flags.view(1, 1, -1, 1, 1)


def _segmented_forward_steps(k, w, u, s0, first, seq, dot: Dot, kind: str):
    """The forward steps over dim 2, restarting at every `first` chunk from s0[seq]; returns
    (V_new, the state entering every step)."""

    def step(s, x):
        k_n, w_n, u_n, first_n, s0_n = x
        s_in = torch.where(first_n, s0_n, s)
        v_new = dot_add(u_n, w_n, s_in, dot, alpha=-1.0)
        return dot_add(s_in, k_n.transpose(-1, -2), v_new, dot), (v_new, s_in)

    _, (v_new, entering) = _run(step, s0.new_zeros(1, *s0.shape[1:]), (k, w, u, _flag(first), _per_chunk(s0, seq)),
                                kind, dim=2)
    return v_new, entering


def _by_sequence(chunk_states: torch.Tensor, index: torch.Tensor, empty: torch.Tensor, fallback: torch.Tensor):
    """chunk_states [1, H, N, K, V] at each sequence's chunk -> [S, H, K, V]; `fallback` where empty."""
    picked = chunk_states[0, :, index].movedim(1, 0)
    return torch.where(empty.view(-1, 1, 1, 1), fallback, picked)


def _segmented_state_pass(k, w, u, s0, dot: Dot, impl: Stepping, segments: Segments):
    m = impl.group
    seq, first = segments.seq.flatten(), segments.first.flatten()
    if m == 1:
        v_new, states = _segmented_forward_steps(k, w, u, s0, first, seq, dot, impl.kind)
        increments = dot(k.transpose(-1, -2), v_new)
    else:
        k_l, w_l, u_l = _state_chunk_wy(k, w, u, dot, impl)
        v_new, entering = _segmented_forward_steps(k_l, w_l, u_l, s0, segments.first[:, 0], segments.seq[:, 0], dot,
                                                   impl.kind)
        v_new = v_new.reshape(u.shape)
        increments = dot(k.transpose(-1, -2), v_new)
        within = _exclusive_cumsum(_grouped(increments, m), dim=3)  # inside each state chunk
        states = (entering.unsqueeze(3) + within).flatten(2, 3)
    ends = states + increments
    final = _by_sequence(ends, segments.last_chunk, segments.empty, s0)
    return v_new, states, final


def _segmented_backward_steps(k, w, g, x, ds_final, last, seq, dot: Dot, kind: str):
    """The backward steps over dim 2 in reverse, restarting at every `last` chunk from
    ds_final[seq]; returns (the e of every step, the gradient entering every step)."""

    def step(ds, xs):
        k_n, w_n, g_n, x_n, last_n, dsf_n = xs
        ds_in = torch.where(last_n, dsf_n, ds)
        e = dot_add(x_n, k_n, ds_in, dot)
        return ds_in + dot_add(g_n, w_n.transpose(-1, -2), e, dot, alpha=-1.0), (e, ds_in)

    xs = (k, w, g, x, _flag(last), _per_chunk(ds_final, seq))
    _, (e, entering) = _run(step, ds_final.new_zeros(1, *ds_final.shape[1:]), xs, kind, dim=2, reverse=True)
    return e, entering


def _segmented_state_pass_backward(k, w, g, dv_local, ds_final, dot: Dot, impl: Stepping, segments: Segments):
    m = impl.group
    seq, last = segments.seq.flatten(), segments.last.flatten()
    if m == 1:
        dv_new, ds_next = _segmented_backward_steps(k, w, g, dv_local, ds_final, last, seq, dot, impl.kind)
        increments = g - dot(w.transpose(-1, -2), dv_new)
    else:
        V = dv_local.shape[-1]
        e, start = _state_chunk_responses(k, w, g, dv_local, dot, impl)

        def step(d, xs):
            g_l, m_l, last_n, dsf_n = xs
            d_end = torch.where(last_n, dsf_n, d)
            return dot_add(g_l, m_l, d_end, dot), d_end

        _, d_end = _run(step, torch.zeros_like(start[:, :, 0, :, :V]),
                        (start[..., :V], start[..., V:], _flag(segments.last[:, -1]),
                         _per_chunk(ds_final, segments.seq[:, 0])), impl.kind, dim=2, reverse=True)
        dv_new = (e[..., :V] + dot(e[..., V:], d_end.unsqueeze(3))).reshape(dv_local.shape)
        increments = g - dot(w.transpose(-1, -2), dv_new)
        within = _exclusive_cumsum(_grouped(increments, m), dim=3, reverse=True)
        ds_next = (d_end.unsqueeze(3) + within).flatten(2, 3)
    ds0 = _by_sequence(ds_next + increments, segments.first_chunk, segments.empty, ds_final)
    return dv_new, ds_next, ds0
