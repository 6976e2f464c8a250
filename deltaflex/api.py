"""Public entry points: `delta_rule` (deltaflex's names) and `chunk_delta_rule` (fla's names)."""

from __future__ import annotations

import torch

from .chunk import ChunkDeltaRuleFunction
from .plan import Plan, resolve_plan
from .tuning.auto import auto_plan
from .chunk.layout import packed_layout
from .validation import check_cu_seqlens, check_delta_rule_inputs


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int | None = None,
    plan: str | Plan | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The DeltaNet delta rule by the chunkwise-parallel algorithm.

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T,   o_t = scale * S_t^T q_t.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H] (q's dtype or float32).
            bfloat16, float16, float32 or float64; any T >= 1; K, V <= 256.
        scale: defaults to K ** -0.5.
        initial_state: [N, H, K, V], N = B; float32 (float64 with float64 inputs), or a
            lower-precision float, which is upcast exactly.
        output_final_state: also return the state after the last token, [N, H, K, V].
        cu_seqlens: [N + 1] int32/int64 boundaries of N sequences packed along T (B = 1; fla's
            convention): each starts from its own initial state (or zeros) and ends in its own
            final state, [N, H, K, V]; nothing crosses a boundary. Sequences may be empty.
        cu_seqlens_cpu: a host copy of cu_seqlens; without it, reading the boundaries costs a
            device sync.
        use_qk_l2norm: L2-normalise q and k inside the op (gradients flow through it).
        chunk_size: 16, 32, 64 or 128; default: the plan's (64 for the named plans).
        plan: a `deltaflex.Plan`, or a name: "eager" (blocked ops, no compile), "compiled" (the
            same ops through torch.compile), "triton" (hand-written kernels), "mixed-<stage>"
            (compiled, with the hand-written kernel for one stage), "fused" (the fused Triton
            path), or "auto": the plan `deltaflex tune` cached for this device, dtype and shape,
            else the default plan (`deltaflex.plan.default_plan`: on CUDA "fused" for bf16 with
            head dims of 64 or more, else "triton"; "compiled" for float64).
            None picks "auto" on CUDA and on CPU the eager blocked ops, in chunks of 32 for head
            dims up to 64 (else 64).

    Returns:
        (o [B, T, H, V] in q's dtype, final_state or None).
    """
    scale = check_delta_rule_inputs(q, k, v, beta, scale, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    packed = cu_seqlens is not None or cu_seqlens_cpu is not None
    lengths = check_cu_seqlens(cu_seqlens, cu_seqlens_cpu, B, T, q.device) if packed else None
    auto = lambda: auto_plan(q.device, q.dtype, B, T, H, K, v.shape[-1])  # noqa: E731 - only called for "auto"
    plan = resolve_plan(plan, chunk_size, q.device.type, auto=auto, dtype=q.dtype, head_dims=(K, v.shape[-1]))
    if plan.fused:
        from .fused.function import FusedDeltaRuleFunction, Packing
        from .fused.segments import Segments, segment_length

        if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"plan 'fused' takes bfloat16, float16 or float32 inputs, got q of dtype {q.dtype}; "
                            "use plan='compiled' or 'eager' for float64")
        C = plan.chunk_size
        packing = None if lengths is None else Packing.of(lengths, C, q.device)
        chunks = [-(-n // C) for n in lengths] if packed else [-(-T // C)] * B
        segment = segment_length(plan.state_segment, chunks, H, K, v.shape[-1], q.device)
        segments = Segments.of(lengths, C, segment, q.device) if packed and segment else None
        return FusedDeltaRuleFunction.apply(q, k, v, beta, initial_state, scale, bool(use_qk_l2norm),
                                            bool(output_final_state), C, packing, segment, segments)
    layout = None if lengths is None else packed_layout(lengths, plan.chunk_size, plan.state_group, q.device)
    return ChunkDeltaRuleFunction.apply(
        q, k, v, beta, initial_state, scale, bool(use_qk_l2norm), bool(output_final_state), plan, layout
    )


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla-core 0.6.0's `fla.ops.delta_rule.chunk_delta_rule` signature over `delta_rule`.

    Extra keyword arguments: `chunk_size` and `plan`, as in `delta_rule`.
    """
    if kwargs.pop("head_first", False):
        raise ValueError("head_first=True is not supported (fla removed it too); pass [B, T, H, D] tensors")
    unknown = set(kwargs) - {"chunk_size", "plan"}
    if unknown:
        raise TypeError(f"chunk_delta_rule got unexpected keyword arguments {sorted(unknown)}")
    return delta_rule(
        q,
        k,
        v,
        beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        cu_seqlens_cpu=cu_seqlens_cpu,
        use_qk_l2norm=use_qk_l2norm_in_kernel,
        **kwargs,
    )
