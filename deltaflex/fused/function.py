"""The fused path as an autograd.Function: what `delta_rule` runs for plans with `fused=True`.

Forward keeps the inputs and the chunks' inverses T for backward, nothing else (and without
gradients to come, no T). With
`use_qk_l2norm`, q and k are normalised in float32 and rounded back to their dtype before the
kernels (as fla does); backward takes dq, dk through the normalisation.
"""

from __future__ import annotations

import torch

from ..chunk.function import l2norm_backward
from ..reference import l2norm
from ..validation import state_dtype
from .chunk import Packing, fused_backward, fused_forward


def _normalised(q: torch.Tensor, k: torch.Tensor, use_qk_l2norm: bool):
    if not use_qk_l2norm:
        return q, k
    return l2norm(q.float()).to(q.dtype), l2norm(k.float()).to(k.dtype)


class FusedDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, initial_state, scale, use_qk_l2norm, output_final_state, chunk_size,
                packing: Packing | None, segment: int = 0, segments=None):
        q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
        s0 = None if initial_state is None else initial_state.to(state_dtype(q.dtype)).contiguous()
        qn, kn = _normalised(q, k, use_qk_l2norm)
        tables = () if packing is None else (packing.chunks, packing.seqs)
        two_level = ()  # segment > 1: the forward's two-level state pass (segments.py); backward's stay one-level
        if segment > 1:
            two_level = (*(tables or (None, None)), segment, *(segments or ()))
        keep_t = any(ctx.needs_input_grad[:5])  # else backward never runs: T is not written (prefill, inference)
        o, final, t = fused_forward(qn, kn, v, beta, s0, scale, chunk_size, *(two_level or tables), keep_t=keep_t)
        ctx.save_for_backward(q, k, v, beta, s0, t)
        ctx.options = (scale, use_qk_l2norm, chunk_size, packing, None if initial_state is None else initial_state.dtype)
        return o, (final if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, beta, s0, t = ctx.saved_tensors
        scale, use_qk_l2norm, chunk_size, packing, initial_dtype = ctx.options
        qn, kn = _normalised(q, k, use_qk_l2norm)
        tables = () if packing is None else (packing.chunks, packing.seqs)
        dfinal = None if dfinal is None else dfinal.to(torch.float32).contiguous()
        dq, dk, dv, dbeta, ds0 = fused_backward(qn, kn, v, beta, t, s0, do.to(v.dtype).contiguous(), dfinal, scale,
                                                chunk_size, *tables)
        if use_qk_l2norm:
            dq = l2norm_backward(q.float(), dq.float()).to(q.dtype)
            dk = l2norm_backward(k.float(), dk.float()).to(k.dtype)
        ds0 = None if initial_dtype is None else ds0.to(initial_dtype)
        return dq, dk, dv, dbeta, ds0, None, None, None, None, None, None, None
