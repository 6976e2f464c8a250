"""Causal softmax attention with rotary embeddings: global, or over a sliding window; and its KV cache.

Sliding window: the token at position t sees positions t - window_size + 1 .. t (itself included).
Training (no cache): SDPA (flash attention for the global case; a banded boolean mask for the
sliding window) or flex_attention with a causal / sliding-window block mask, compiled on CUDA.
Decoding: a `KVCache` holds the rotated keys and the values with each slot's absolute position;
global layers append to it, sliding-window layers write into a ring buffer of `window_size` slots
(slot = position mod window_size), so a decode step costs O(window) however long the sequence.
New tokens attend over the cached slots and themselves under a position mask, which is what makes a
cached step equal the full forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..validation import check_hidden_states
from .config import ATTENTION_BACKENDS


class KVCache(NamedTuple):
    key: torch.Tensor  # [B, H, S, D], rotary applied
    value: torch.Tensor  # [B, H, S, D]
    positions: torch.Tensor  # [S] int64: the absolute position held by each slot, -1 for an empty one


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half form) over the last dimension of [B, H, T, D] tensors.
    Frequencies are computed per call in float32 (float64 for float64 inputs), not kept in a buffer
    that `model.bfloat16()` would round."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        inv_freq = self.theta ** -(torch.arange(0, self.head_dim, 2, dtype=acc, device=x.device) / self.head_dim)
        angles = positions.to(acc)[:, None] * inv_freq  # [T, D/2]
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x.to(acc).chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        window_size: int | None = None,
        rope_theta: float = 10000.0,
        backend: str = "sdpa",
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"num_heads = {num_heads} must divide hidden_size = {hidden_size}")
        if window_size is not None and (isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1):
            raise ValueError(f"window_size must be None (global attention) or a positive integer, got {window_size!r}")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, hidden_size // num_heads
        self.window_size, self.backend = window_size, backend
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.rotary = Rotary(self.head_dim, rope_theta)
        self._block_masks = {}  # (T, device) -> flex_attention BlockMask

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, window_size={self.window_size}, backend={self.backend}"

    def forward(
        self, hidden_states: torch.Tensor, cache: KVCache | None = None, use_cache: bool = False
    ) -> tuple[torch.Tensor, KVCache | None]:
        """hidden_states [B, T, hidden_size] -> (output [B, T, hidden_size], cache or None)."""
        self._check_inputs(hidden_states, cache)
        B, T, _ = hidden_states.shape
        q, k, v = (self._heads(p(hidden_states)) for p in (self.q_proj, self.k_proj, self.v_proj))
        start = 0 if cache is None else cache.positions.max() + 1  # a tensor: no host sync while decoding
        positions = torch.arange(T, device=hidden_states.device) + start
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is None:
            o = self._attend(q, k, v)
            seen = KVCache(k, v, positions)
        else:  # the cached slots and the new tokens, under a position mask
            seen = KVCache(
                torch.cat([cache.key, k], dim=2), torch.cat([cache.value, v], dim=2), torch.cat([cache.positions, positions])
            )
            mask = self._position_mask(positions, seen.positions)
            o = F.scaled_dot_product_attention(q, seen.key, seen.value, attn_mask=mask)
        o = self.o_proj(o.transpose(1, 2).reshape(B, T, self.hidden_size))
        if not (use_cache or cache is not None):
            return o, None
        return o, (seen if self.window_size is None else self._ring(cache, k, v, positions))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # [B, H, T, D]

    def _position_mask(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """[T, S] bool, True where the query may see the key: filled, not in the future, in the window."""
        q, k = query_positions[:, None], key_positions[None, :]
        mask = (k >= 0) & (k <= q)
        if self.window_size is not None:
            mask &= k > q - self.window_size
        return mask

    def _attend(self, q, k, v):
        """Attention over one whole sequence from its start."""
        T = q.shape[2]
        if self.backend == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            return _flex(flex_attention, q.device)(q, k, v, block_mask=self._block_mask(T, q.device))
        if self.window_size is None or self.window_size >= T:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        positions = torch.arange(T, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self._position_mask(positions, positions))

    @torch.compiler.disable  # built eagerly once per length and kept, not traced into a graph
    def _block_mask(self, T: int, device):
        key = (T, str(device))
        if key not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            window = self.window_size

            def visible(b, h, q_idx, kv_idx):
                causal = kv_idx <= q_idx
                return causal if window is None else causal & (q_idx - kv_idx < window)

            self._block_masks[key] = create_block_mask(visible, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
        return self._block_masks[key]

    def _ring(self, cache, k, v, positions) -> KVCache:
        """The sliding window's cache: the new tokens written at slot = position mod window_size."""
        W = self.window_size
        if cache is None:  # an empty ring
            B, H, _, D = k.shape
            cache = KVCache(k.new_zeros(B, H, W, D), v.new_zeros(B, H, W, D), positions.new_full((W,), -1))
        n = min(k.shape[2], W)  # only the last W tokens can be seen again
        slots = positions[-n:] % W
        return KVCache(
            cache.key.index_copy(2, slots, k[:, :, -n:].to(cache.key.dtype)),
            cache.value.index_copy(2, slots, v[:, :, -n:].to(cache.value.dtype)),
            cache.positions.index_copy(0, slots, positions[-n:]),
        )

    def _check_inputs(self, x, cache) -> None:
        check_hidden_states(x, self.hidden_size)
        if cache is None:
            return
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache (from this layer's use_cache=True), got {type(cache).__name__}")
        B, H, D = x.shape[0], self.num_heads, self.head_dim
        key_shape = tuple(cache.key.shape)
        if len(key_shape) != 4 or key_shape[0] != B or key_shape[1] != H or key_shape[3] != D:
            raise ValueError(f"cache.key must be [B, H, S, D] with B, H, D = {(B, H, D)}, got {key_shape}")
        if self.window_size is not None and key_shape[2] != self.window_size:
            raise ValueError(f"cache.key must hold window_size = {self.window_size} slots, got {key_shape[2]}")
        if tuple(cache.value.shape) != key_shape or tuple(cache.positions.shape) != key_shape[2:3]:
            raise ValueError("cache.value must match cache.key, and cache.positions must be [S]")


_compiled_flex = {}


def _flex(flex_attention, device):
    """flex_attention compiled once per process on CUDA (eager flex_attention is a slow reference);
    as it is elsewhere, and inside a caller's torch.compile, which traces it anyway."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    if "cuda" not in _compiled_flex:
        _compiled_flex["cuda"] = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex["cuda"]
