"""The four stages and their implementations ("backends"), forward and backward, by name.

Each stage has one signature whatever its backend, so a plan can take any backend for any stage:

    solve           (k, beta, dot)                           -> t
    solve_backward  (k, beta, t, dt, dot)                    -> (dk, dbeta)
    wy              (t, k, v, beta, dot)                     -> (w, u)
    wy_backward     (t, k, v, beta, dw, du, dot)             -> (dt, dk, dv, dbeta)
    state           (k, w, u, s0, dot, impl, segments)       -> (v_new, states, final)
    state_backward  (q, k, w, v_new, states, do, dv_local, ds_final, scale, dot, impl, segments)
                                                             -> (dv_new, dw, dk, ds0)
    output          (q, k, v_new, states, scale, dot)        -> o
    output_backward (q, k, v_new, states, do, scale, dot)    -> (dq, dk, dv_local)

Tensors are in chunk layout [B, H, N, C, D]; `dot` is the precision policy's product
(`matmul.make_dot`; its .keywords say the policy and low dtype); `impl` is how a state pass runs
its steps (`state.Stepping`: loop or scan, one or two levels), which other backends may ignore;
`segments` (`layout.Segments` or None) places packed sequences: s0 and final are then per sequence.
The "compiled" backend is the blocked PyTorch ops of this package; hand-written Triton kernels
register as "triton" when `deltaflex.kernels` is imported, and also take a keyword `config`: the
plan's launch configuration for the stage (deltaflex.kernels says what it holds), and a keyword
`chunk_size`: when nonzero, q, k, v, beta and do come in the caller's token layout [B, T, H, D]
instead (what they output stays in the chunk layout), packed sequences with a keyword `chunk_table`
(layout.Segments.rows).
"""

from __future__ import annotations

from collections.abc import Callable

from . import output as _output
from . import solve as _solve
from . import state as _state
from . import wy as _wy
from .matmul import scaled_dot

STAGES = ("solve", "wy", "state", "output")
_REGISTRY: dict[tuple[str, str], tuple[Callable, Callable]] = {}


def register(stage: str, backend: str, forward: Callable, backward: Callable) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    _REGISTRY[stage, backend] = (forward, backward)


def _load(backend: str) -> None:
    if backend == "triton":
        from .. import kernels  # noqa: F401  (registers the Triton stages)


def implementation(stage: str, backend: str) -> tuple[Callable, Callable]:
    """(forward, backward) of `stage` in `backend`; NotImplementedError when it does not exist."""
    try:
        # Loaded before the registry is read: inside torch.compile, Dynamo reads the registry once,
        # and an import that fills it after that read stays unseen.
        _load(backend)
    except ImportError as e:
        raise NotImplementedError(f"backend {backend!r} is not available: {e}") from e
    if (stage, backend) not in _REGISTRY:
        raise NotImplementedError(f"stage {stage!r} has no {backend!r} implementation")
    return _REGISTRY[stage, backend]


def available_backends(stage: str) -> tuple[str, ...]:
    for backend in ("triton",):
        try:
            _load(backend)
        except ImportError:
            pass
    return tuple(sorted(b for s, b in _REGISTRY if s == stage))


def _solve_forward(k, beta, dot):
    return _solve.solve_unit_lower(_solve.kkt(k, beta, dot))


def _solve_backward(k, beta, t, dt, dot):
    return _solve.kkt_backward(k, beta, _solve.solve_unit_lower_backward(t, dt), dot)


def _state_forward(k, w, u, s0, dot, impl, segments):
    return _state.state_pass(k, w, u, s0, dot=dot, impl=impl, segments=segments)


def _state_backward(q, k, w, v_new, states, do, dv_local, ds_final, scale, dot, impl, segments):
    dv_new, ds_next, ds0 = _state.state_pass_backward(
        q, k, w, do, dv_local, ds_final, scale, dot=dot, impl=impl, segments=segments
    )
    dk = dot(v_new, ds_next.transpose(-1, -2))
    dw = scaled_dot(dv_new, states.transpose(-1, -2), dot, -1.0)
    return dv_new, dw, dk, ds0


register("solve", "compiled", _solve_forward, _solve_backward)
register("wy", "compiled", _wy.wy, _wy.wy_backward)
register("state", "compiled", _state_forward, _state_backward)
register("output", "compiled", _output.output, _output.output_backward)
