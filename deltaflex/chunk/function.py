"""The chunkwise delta rule, forward and backward, as blocked PyTorch ops, and its autograd.Function.

Forward: kkt + solve -> wy -> state pass -> output, batched over every chunk except the state pass.
Between forward and backward only the inputs and the chunks' inverses T (B T H C floats, as fla
keeps) are kept; backward recomputes the rest (W, U, the chunk states) from them, then a reverse
state pass carries dS across chunks and every other gradient is again batched over all chunks.

Products accumulate in float32 (float64 for float64 inputs) under the plan's precision policy
(`matmul.py`); outputs and gradients return in their inputs' dtypes.
"""

from __future__ import annotations

import functools
import threading

import torch
from torch.fx.experimental.symbolic_shapes import guard_scalar

from ..plan import Plan
from ..reference import L2NORM_EPS, l2norm
from ..validation import state_dtype
from . import graphs
from .layout import PackedLayout, from_chunks, from_chunks_packed, to_chunks, to_chunks_packed
from .matmul import make_dot
from .stages import STAGES, implementation
from .state import Stepping


def l2norm_backward(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Gradient of y = l2norm(x): r (dy - y (y . dy)) with r = 1 / ||x||."""
    r = torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)
    y = x * r
    return r * (dy - y * (y * dy).sum(-1, keepdim=True))


def _low_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of exact operands: bf16/fp16 inputs stay as they are, others are the state dtype."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else state_dtype(dtype)


def _chunked(x: torch.Tensor, plan: Plan, layout: PackedLayout | None, dtype: torch.dtype | None = None,
             tokens: bool = False):
    """x [B, T, H, *D] as the stages take it: in the chunk layout, or as it is where `tokens`."""
    dtype = _low_dtype(x.dtype) if dtype is None else dtype
    if tokens:  # a view of its own: `_run` may mark its dims dynamic, which must not stick to the caller's
        return x.to(dtype).contiguous().view(x.shape)
    if layout is None:
        return to_chunks(x, plan.chunk_size, dtype, plan.state_group)
    return to_chunks_packed(x, layout, plan.chunk_size, dtype, plan.state_group)


def _unchunked(x: torch.Tensor, T: int, dtype: torch.dtype, layout: PackedLayout | None) -> torch.Tensor:
    return from_chunks(x, T, dtype) if layout is None else from_chunks_packed(x, layout, dtype)


def _initial_state(initial_state, q, v, layout: PackedLayout | None):
    H, K = q.shape[2:]
    N = q.shape[0] if layout is None else layout.segments.empty.shape[0]
    if initial_state is None:
        return q.new_zeros(N, H, K, v.shape[-1], dtype=state_dtype(q.dtype))
    return initial_state.to(state_dtype(q.dtype))


def forward_chunks(q, k, v, beta, s0, segments, *, scale, use_qk_l2norm, policy, stepping, backends, chunk_size=0):
    """The forward on grouped chunk-layout tensors: q, k [B, H, N/g, g, C, K], v [..., C, V] (in
    their low dtype), beta [B, H, N/g, g, C] and s0 [B, H, K, V] (state dtype); returns
    (o [B, H, N, C, V], final, t [B, H, N/g, g, C, C]: the inverses, which backward reuses).
    `backends` names each stage's implementation (and launch
    configuration, see `_implementations`), in STAGES order;
    `segments` places packed sequences (None: B independent sequences).
    chunk_size > 0: q, k, v, beta are the caller's token-layout tensors ([B, T, H, D], chunks of
    chunk_size rows, packed sequences placed by segments.rows; every stage on the Triton backend,
    g = 1, see `token_layout`) and t is [B, H, N, C, C]."""
    solve, wy, state, output = (forward for forward, _ in _implementations(backends, chunk_size, segments))
    if not chunk_size:
        groups = q.shape[2:4]
        q, k, v, beta = (x.flatten(2, 3) for x in (q, k, v, beta))
    dot = make_dot(policy, q.dtype)
    if use_qk_l2norm:
        q, k = l2norm(q.to(s0.dtype)), l2norm(k.to(s0.dtype))
    t = solve(k, beta, dot)
    w, u = wy(t, k, v, beta, dot)
    v_new, states, final = state(k, w, u, s0, dot, stepping, segments)
    return output(q, k, v_new, states, scale, dot), final, t if chunk_size else t.unflatten(2, groups)


def backward_chunks(q, k, v, beta, t, s0, do, ds_final, segments, *, scale, use_qk_l2norm, policy, stepping,
                    backends, chunk_size=0):
    """Gradients of `forward_chunks` given its inverses t, do (chunk layout, low dtype) and the final
    state's gradient; returns (dq, dk, dv, dbeta, ds0) in chunk layout, float32 (float64).
    chunk_size > 0: the inputs and do in the token layout, as `forward_chunks` takes them; dq and dk
    are then the gradients of the normalised q and k where use_qk_l2norm (the caller takes them
    through l2norm's backward in the token layout)."""
    (_, solve_bwd), (wy, wy_bwd), (state, state_bwd), (_, output_bwd) = _implementations(backends, chunk_size,
                                                                                         segments)
    if not chunk_size:
        q, k, v, beta, t, do = (x.flatten(2, 3) for x in (q, k, v, beta, t, do))
    dot = make_dot(policy, q.dtype)
    q_raw, k_raw = q, k
    if use_qk_l2norm:
        q_raw, k_raw = q.to(s0.dtype), k.to(s0.dtype)
        q, k = l2norm(q_raw), l2norm(k_raw)
    w, u = wy(t, k, v, beta, dot)  # recomputed, with the chunk states: kept, they would cost O(T H K)
    v_new, states, _ = state(k, w, u, s0, dot, stepping, segments)
    del u  # not needed again: freed before the backward's peak where the stages run eagerly

    dq, dk_output, dv_local = output_bwd(q, k, v_new, states, do, scale, dot)
    dv_new, dw, dk_state, ds0 = state_bwd(
        q, k, w, v_new, states, do, dv_local, ds_final, scale, dot, stepping, segments
    )
    dt, dk_wy, dv, dbeta_wy = wy_bwd(t, k, v, beta, dw, dv_new, dot)
    dk_solve, dbeta_solve = solve_bwd(k, beta, t, dt, dot)
    dk = (dk_output + dk_state).add_(dk_wy).add_(dk_solve)  # summed in place past the first sum
    dbeta = dbeta_wy + dbeta_solve
    if use_qk_l2norm and not chunk_size:
        dq, dk = l2norm_backward(q_raw, dq), l2norm_backward(k_raw, dk)
    return dq, dk, dv, dbeta, ds0


def _implementations(backends, chunk_size: int = 0, segments=None):
    """(forward, backward) of every stage, in STAGES order, from `backends`: (backend, launch) pairs,
    where a launch (a hand-written stage's launch configuration as plain tuples, so that compiled
    graphs see constants) is passed to the stage as `config`; chunk_size > 0 (token-layout inputs,
    which only the hand-written stages read) likewise, with packed sequences' chunk table."""
    out = []
    for stage, (backend, launch) in zip(STAGES, backends):
        forward, backward = implementation(stage, backend)
        keywords = {} if launch is None else {"config": launch}
        if chunk_size:
            if backend != "triton":
                raise ValueError(f"token-layout inputs need every stage on the triton backend, got {stage}={backend}")
            keywords["chunk_size"] = chunk_size
            if segments is not None:
                keywords["chunk_table"] = segments.rows
        if keywords:
            forward, backward = functools.partial(forward, **keywords), functools.partial(backward, **keywords)
        out.append((forward, backward))
    return out


def token_layout(plan: Plan) -> bool:
    """Whether the stages read the caller's [B, T, H, D] tensors as they are (masking the rows of a
    ragged last chunk, of every packed sequence) rather than a padded chunk-layout copy: when every
    stage is hand-written and the state pass is one-level."""
    return plan.state_group == 1 and all(b == "triton" for b in plan.backends().values())


def _launch(config) -> tuple | None:
    return None if config is None else (config.blocks, config.num_warps, config.num_stages)


def _chunk_options(plan: Plan, device_type: str, scale: float, use_qk_l2norm: bool, tokens: bool = False) -> dict:
    backends = tuple((plan.backends()[stage], _launch(getattr(plan, f"{stage}_kernel"))) for stage in STAGES)
    return dict(scale=scale, use_qk_l2norm=use_qk_l2norm, policy=plan.precision_for(device_type), backends=backends,
                chunk_size=plan.chunk_size if tokens else 0)


def chunk_delta_rule_fwd(q, k, v, beta, initial_state, *, scale, use_qk_l2norm, plan, device_type, layout=None):
    """Returns (o [B, T, H, V] in q's dtype, final state [N, H, K, V] in the state dtype, the chunks'
    inverses for chunk_delta_rule_bwd)."""
    tokens = token_layout(plan)
    chunks = (*(_chunked(x, plan, layout, tokens=tokens) for x in (q, k, v)),
              _chunked(beta, plan, layout, state_dtype(q.dtype), tokens))
    s0 = _initial_state(initial_state, q, v, layout)
    segments = None if layout is None else layout.segments
    options = _chunk_options(plan, device_type, scale, use_qk_l2norm, tokens)
    o, final, t = _run(forward_chunks, plan, (*chunks, s0, segments), options,
                       token_inputs=(0, 1, 2, 3) if tokens else ())
    # a CUDA-graph replay's outputs are its own buffers: copy out what outlives the call
    return _unchunked(o, q.shape[1], q.dtype, layout), final.clone(), t.clone() if plan.cuda_graph else t


def chunk_delta_rule_bwd(
    q, k, v, beta, initial_state, t, do, dfinal, *, scale, use_qk_l2norm, plan, device_type, layout=None
):
    """Returns (dq, dk, dv, dbeta, d initial_state or None), each in its input's dtype."""
    tokens = token_layout(plan)
    chunks = (*(_chunked(x, plan, layout, tokens=tokens) for x in (q, k, v)),
              _chunked(beta, plan, layout, state_dtype(q.dtype), tokens))
    doc = _chunked(do.to(q.dtype), plan, layout, tokens=tokens)
    s0 = _initial_state(initial_state, q, v, layout)
    ds_final = torch.zeros_like(s0) if dfinal is None else dfinal.to(s0.dtype)
    segments = None if layout is None else layout.segments
    options = _chunk_options(plan, device_type, scale, use_qk_l2norm, tokens)
    dq, dk, dv, dbeta, ds0 = _run(backward_chunks, plan, (*chunks, t, s0, doc, ds_final, segments), options,
                                  token_inputs=(0, 1, 2, 3, 6) if tokens else ())
    T = q.shape[1]
    if tokens and use_qk_l2norm:  # l2norm's backward, left to the token layout by backward_chunks
        dq = l2norm_backward(q.to(s0.dtype), _unchunked(dq, T, s0.dtype, layout))
        dk = l2norm_backward(k.to(s0.dtype), _unchunked(dk, T, s0.dtype, layout))
        grads = (dq.to(q.dtype), dk.to(k.dtype), _unchunked(dv, T, v.dtype, layout),
                 _unchunked(dbeta, T, beta.dtype, layout))
    else:
        grads = tuple(_unchunked(g, T, x.dtype, layout) for g, x in zip((dq, dk, dv, dbeta), (q, k, v, beta)))
    return (*grads, None if initial_state is None else ds0.to(initial_state.dtype, copy=True))


@functools.cache
def _compiled(fn, mode, dynamic: bool = True):
    compiled = torch.compile(fn, fullgraph=True, mode=None if mode == "default" else mode,
                             dynamic=None if dynamic else False)

    def run(*args, **kwargs):
        # The bf16x3 policy splits x into x.to(bf16) and its rounding error; by default Inductor
        # folds such cast pairs away inside a fused kernel, which would zero the error term.
        with torch._inductor.config.patch(emulate_precision_casts=True):
            out = compiled(*args, **kwargs)
        if mode == "reduce-overhead":  # CUDA-graph outputs are overwritten by the next replay
            out = torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
        return out

    return run


_isa_probe: threading.Thread | None = None


def _probe_cpu_isa() -> None:
    """Starts Inductor's CPU vector-ISA detection in the background, once a process.

    Inductor's C++ backend picks its SIMD flags on its first kernel by compiling and loading a test
    program per candidate ISA (AVX-512 VNNI, AVX-512, AVX2; each with the full ATen vector headers):
    ~5.5 s of a cold first call on a 2-core CPU, spent serially in the middle of codegen. Started
    here it overlaps tracing, AOT autograd and lowering instead; if codegen gets there first it
    waits on the probe's file locks and reuses what it has built (codecache's ISA check locks every
    test build). Results are what Inductor would have found itself: the same checks, cached.
    """
    global _isa_probe
    if _isa_probe is not None:
        return
    try:  # imported here, not in the thread: the compile imports them too, and concurrently with it
        from torch._inductor import codecache, cpp_builder  # noqa: F401
        from torch._inductor.cpu_vec_isa import pick_vec_isa
    except ImportError:
        return

    def probe():
        try:
            pick_vec_isa()
        except Exception:  # Inductor repeats the check itself and reports what fails
            pass

    _isa_probe = threading.Thread(target=probe, name="deltaflex-cpu-isa-probe", daemon=True)
    _isa_probe.start()


def _run(fn, plan: Plan, tensors: tuple, options: dict, token_inputs: tuple[int, ...] = ()):
    """fn(*tensors, **options) on grouped chunk-layout tensors (those at `token_inputs` in the token
    layout), compiled as the plan says.

    Our own compiled graph marks B (dim 0) and N/g (dim 2 of chunk tensors) dynamic and scans over
    chunks: one graph for every batch size and sequence length. (The chunking happens outside the
    graph so that the scan length is an input size, not an expression of T, which torch's scan
    lowering cannot handle yet.) Inside a caller's torch.compile the ops are traced into the
    caller's graph: the scan where N is static there, else a loop over chunks that specialises on N.
    """
    compiling = torch.compiler.is_compiling()
    if plan.compile and not compiling:
        # Two-level passes on CUDA compile once per shape: there Inductor (torch 2.11) fails to
        # generate the group reshapes' symbolic sizes inside the scan ("For s10 + 16, expected [s10]
        # to have been codegen-ed"), whether we mark sizes dynamic or a recompile does.
        dynamic = not plan.unroll and not (plan.state_group > 1 and tensors[0].is_cuda)
        if dynamic:
            for i, arg in enumerate(tensors):
                for x in (t for t in torch.utils._pytree.tree_leaves(arg) if isinstance(t, torch.Tensor)):
                    torch._dynamo.maybe_mark_dynamic(x, 0)
                    if i in token_inputs:  # token layout: T, besides B
                        torch._dynamo.maybe_mark_dynamic(x, 1)
                    elif x.dim() >= 5:  # chunk layout: N/g, besides B
                        torch._dynamo.maybe_mark_dynamic(x, 2)
        if tensors[0].device.type == "cpu":
            _probe_cpu_isa()
        options = dict(options, stepping=_stepping(plan, not plan.unroll))
        compiled = _compiled(fn, plan.compile_mode, dynamic)
        if plan.cuda_graph and tensors[0].is_cuda:
            return graphs.replay(compiled, tensors, options)
        return compiled(*tensors, **options)
    scan = compiling and isinstance(tensors[0].shape[2], int) and not plan.unroll
    return fn(*tensors, **options, stepping=_stepping(plan, scan))


def _stepping(plan: Plan, scan: bool) -> Stepping:
    return Stepping("scan" if scan else "loop", plan.state_group)


class ChunkDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, initial_state, scale, use_qk_l2norm, output_final_state, plan, layout):
        backends = plan.backends()
        for stage, backend in backends.items():
            implementation(stage, backend)  # a missing backend fails here, before any compute
        if torch.compiler.is_compiling() and "triton" in backends.values():
            # Head dims are the kernels' constexprs, so the caller's graph specialises on them anyway; done
            # here, before any intermediate exists: under dynamic shapes Dynamo (torch 2.11) makes every size
            # this forward reads an output of its graph, and one read as a symbol that a launch specialises
            # later comes back an int (its assert: "neither a tensor nor a SymNode").
            guard_scalar(q.shape[-1]), guard_scalar(v.shape[-1])
        options = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, plan=plan, device_type=q.device.type, layout=layout)
        o, final, t = chunk_delta_rule_fwd(q, k, v, beta, initial_state, **options)
        ctx.save_for_backward(q, k, v, beta, initial_state, t)
        ctx.options = options
        return o, (final if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, beta, initial_state, t = ctx.saved_tensors
        dq, dk, dv, dbeta, ds0 = chunk_delta_rule_bwd(q, k, v, beta, initial_state, t, do, dfinal, **ctx.options)
        return dq, dk, dv, dbeta, ds0, None, None, None, None, None
