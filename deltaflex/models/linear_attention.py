"""Linear attention without the delta rule: the baseline DeltaNet improves on (MQAR's "linear").

The layer is DeltaNet's default data flow with the state update swapped:
    x -> q, k, v projections -> short convolution + SiLU -> q, k L2-normalised per head
      -> S_t = S_{t-1} + k_t v_t^T,  o_t = scale * S_t^T q_t   (DeltaNet: S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T)
      -> per-head RMSNorm -> o_proj
With use_short_conv=False the convolution is dropped and the SiLU kept (DeltaNet's flow without
its convolution): the ablation that asks whether the convolution is what lets a mixer recall.
`causal_linear_attention` computes the rule chunk by chunk: within a chunk a masked C x C product,
across chunks a cumulative sum of the chunks' K^T V (O(T/C) states of K x V: fine at model sizes
where this baseline is used). Prefill and decoding run the same function; the cache carries the
state and the short-convolution states.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.conv import ShortConvolution
from ..layers.norm import RMSNorm
from ..validation import check_hidden_states


class LinearAttentionCache(NamedTuple):
    state: torch.Tensor  # [B, H, K, V], float32 (float64 for a float64 layer)
    conv_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # q, k, v: [B, conv_size - 1, D]; None without conv


def causal_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """o_t = scale * (S_0 + sum_{s <= t} k_s v_s^T)^T q_t for q, k [B, T, H, K], v [B, T, H, V].

    Computed in float32 (float64 for float64 inputs), under autocast too (which would round the
    products to bf16); returns (o [B, T, H, V] in q's dtype, the state after the last token
    [B, H, K, V] in the compute dtype).
    """
    with torch.autocast(q.device.type, enabled=False):
        return _chunked(q, k, v, scale, initial_state, chunk_size)


def _chunked(q, k, v, scale, initial_state, chunk_size):
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T  # zero keys and values add nothing to the state

    def chunks(x):  # [B, T, H, D] -> [B, H, N, C, D]
        x = F.pad(x.to(acc), (0, 0, 0, 0, 0, pad))
        return x.transpose(1, 2).unflatten(2, (N, C))

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    kv = kc.transpose(-1, -2) @ vc  # [B, H, N, K, V]: each chunk's sum of k v^T
    before = kv.cumsum(dim=2) - kv  # the state at each chunk's start, from zero
    if initial_state is not None:
        before = before + initial_state.to(acc)[:, :, None]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0)
    o = (qc @ before + scores @ vc) * scale  # [B, H, N, C, V]
    o = o.flatten(2, 3)[:, :, :T].transpose(1, 2)
    return o.to(q.dtype), before[:, :, -1] + kv[:, :, -1]


class LinearAttention(nn.Module):
    def __init__(
        self, hidden_size: int, num_heads: int, conv_size: int = 4, norm_eps: float = 1e-5, use_short_conv: bool = True
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"num_heads = {num_heads} must divide hidden_size = {hidden_size}")
        if not isinstance(use_short_conv, bool):
            raise TypeError(f"use_short_conv must be a bool, got {use_short_conv!r}")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, hidden_size // num_heads
        self.use_short_conv = use_short_conv
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(hidden_size, conv_size, activation="silu")
            self.k_conv1d = ShortConvolution(hidden_size, conv_size, activation="silu")
            self.v_conv1d = ShortConvolution(hidden_size, conv_size, activation="silu")
        self.o_norm = RMSNorm(self.head_dim, eps=norm_eps)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, cache: LinearAttentionCache | None = None, use_cache: bool = False
    ) -> tuple[torch.Tensor, LinearAttentionCache | None]:
        """hidden_states [B, T, hidden_size] -> (output [B, T, hidden_size], cache or None)."""
        self._check_inputs(hidden_states, cache)
        B, T, _ = hidden_states.shape
        (q, k, v), conv_state = self._qkv(hidden_states, cache)
        q, k, v = (x.unflatten(-1, (self.num_heads, self.head_dim)) for x in (q, k, v))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        o, state = causal_linear_attention(q, k, v, initial_state=None if cache is None else cache.state)
        o = self.o_proj(self.o_norm(o).reshape(B, T, self.hidden_size))
        if not (use_cache or cache is not None):
            return o, None
        return o, LinearAttentionCache(state, conv_state)

    def _qkv(self, x, cache):
        """q, k, v [B, T, hidden_size] after the convolution (or without it) and SiLU; the new conv state."""
        projections = (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        if not self.use_short_conv:
            return tuple(F.silu(p) for p in projections), None
        previous = (None, None, None) if cache is None else cache.conv_state
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        (q, conv_q), (k, conv_k), (v, conv_v) = (conv(p, s) for conv, p, s in zip(convs, projections, previous))
        return (q, k, v), (conv_q, conv_k, conv_v)

    def _check_inputs(self, x, cache) -> None:
        check_hidden_states(x, self.hidden_size)
        if cache is None:
            return
        if not isinstance(cache, LinearAttentionCache):
            raise TypeError(f"cache must be a LinearAttentionCache (from use_cache=True), got {type(cache).__name__}")
        want = (x.shape[0], self.num_heads, self.head_dim, self.head_dim)
        if tuple(cache.state.shape) != want:
            raise ValueError(f"cache.state must be [B, H, K, V] = {want}, got {tuple(cache.state.shape)}")
        if (cache.conv_state is None) == self.use_short_conv:
            raise ValueError("cache.conv_state must hold the q, k and v convolution states with short convolution, "
                             "and be None without")
