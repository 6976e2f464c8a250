"""The DeltaNet token-mixing layer: trains with the chunkwise delta rule, decodes token by token.

Data flow (Yang et al. 2024; fla's `DeltaNet` layer, whose argument names, defaults and parameter
names this follows, so an fla state dict loads):
    x -> q, k, v projections -> depthwise causal short convolution -> SiLU
      -> q, k feature map (qk_activation) and normalisation (qk_norm, L2 inside the delta rule)
    beta = sigmoid(b_proj(x)) (x2 with allow_neg_eigval; 1 without use_beta)
    o = delta rule(q, k, v, beta) -> per-head RMSNorm (gated by SiLU(g_proj(x)) with use_gate) -> o_proj

Modes: "chunk" runs `delta_rule` on `plan` (the chunkwise plans), except for one-token inputs
(decoding), which take the recurrent step; "recurrent" always runs `delta_rule_step`, a token loop
meant for decoding and small inputs. `step_backend` is delta_rule_step's backend (None: its default,
the hand-written kernel when decoding on CUDA, compiled ops when training there, eager elsewhere).

Caches: `layer(x, use_cache=True)` also returns a `DeltaNetCache` (the recurrent state and the
short-convolution states); `layer(x_next, cache=cache)` continues from it and returns the next one.
Caches are immutable tuples of tensors with static shapes, so a decode step compiles and replays
under CUDA graphs. Left padding: `attention_mask` [B, T] (1 real token, 0 padding, as in fla) zeroes
the padded positions' inputs (hence their short-convolution inputs) and their beta (hence their
state updates), and their outputs; a left-padded row then gives the outputs and cache of its
unpadded sequence.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..api import delta_rule
from ..plan import Plan
from ..recurrent import BACKENDS as STEP_BACKENDS
from ..recurrent import delta_rule_step
from ..validation import check_hidden_states
from ..validation import MAX_HEAD_DIM
from .conv import ShortConvolution
from .norm import GatedRMSNorm, RMSNorm

MODES = ("chunk", "recurrent")
QK_ACTIVATIONS = ("silu", "relu", "elu", "identity")
QK_NORMS = ("l2", "sum")
SUM_NORM_EPS = 1e-6  # fla's


class DeltaNetCache(NamedTuple):
    """What one layer carries from one call to the next."""

    recurrent_state: torch.Tensor  # [B, H, K, V], float32 (float64 for a float64 layer)
    conv_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # q, k, v: [B, conv_size - 1, D]


class DeltaNet(nn.Module):
    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 4,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        use_beta: bool = True,
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        use_gate: bool = False,
        qk_activation: str = "silu",
        qk_norm: str = "l2",
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
        mode: str = "chunk",
        plan: str | Plan | None = None,
        step_backend: str | None = None,
    ):
        super().__init__()
        self.key_dim = _expanded(hidden_size, expand_k, "expand_k")
        self.value_dim = _expanded(hidden_size, expand_v, "expand_v")
        _check_choice("mode", mode, MODES)
        _check_choice("step_backend", step_backend, (None, *STEP_BACKENDS))
        _check_choice("qk_activation", qk_activation, QK_ACTIVATIONS)
        _check_choice("qk_norm", qk_norm, QK_NORMS)
        for name, dim in (("hidden_size * expand_k", self.key_dim), ("hidden_size * expand_v", self.value_dim)):
            if dim % num_heads or not 1 <= dim // num_heads <= MAX_HEAD_DIM:
                raise ValueError(
                    f"{name} = {dim} must split into num_heads = {num_heads} heads of 1 to {MAX_HEAD_DIM} dims"
                )
        if use_short_conv and conv_size < 1:
            raise ValueError(f"conv_size must be at least 1, got {conv_size}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.use_beta, self.use_short_conv, self.conv_size, self.use_gate = use_beta, use_short_conv, conv_size, use_gate
        self.qk_activation, self.qk_norm, self.allow_neg_eigval = qk_activation, qk_norm, allow_neg_eigval
        self.mode, self.plan, self.step_backend = mode, plan, step_backend

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        if use_beta:
            self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        if use_short_conv:
            # SiLU on q and k belongs to the feature map, so the convolution applies it only for "silu"
            qk_act = "silu" if qk_activation == "silu" else None
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias, activation=qk_act)
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias, activation=qk_act)
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, bias=conv_bias, activation="silu")
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: DeltaNetCache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, DeltaNetCache | None]:
        """hidden_states [B, T, hidden_size] -> (output [B, T, hidden_size], cache or None).

        attention_mask: [B, T] (or [B, T' >= T], whose last T columns are used), 1 for real tokens and
            0 for left padding; bool, integer or floating.
        cache: a `DeltaNetCache` from this layer's previous call on the same sequences.
        use_cache: return the cache after these tokens; implied when `cache` is given.
        """
        mask = self._check_inputs(hidden_states, attention_mask, cache)
        B, T, _ = hidden_states.shape
        x = hidden_states if mask is None else hidden_states * mask[..., None]
        q, k, v, conv_state = self._qkv(x, cache)
        beta = self._beta(x)
        if mask is not None:
            beta = beta * mask[..., None]
        return_cache = use_cache or cache is not None
        state = None if cache is None else cache.recurrent_state
        l2 = self.qk_norm == "l2"
        if self.mode == "recurrent" or T == 1:
            o, state = delta_rule_step(q, k, v, beta, state, use_qk_l2norm=l2, backend=self.step_backend)
        else:
            o, state = delta_rule(
                q, k, v, beta, initial_state=state, output_final_state=return_cache, use_qk_l2norm=l2, plan=self.plan
            )
        o = self.o_norm(o, self._heads(self.g_proj(x), self.head_v_dim)) if self.use_gate else self.o_norm(o)
        o = self.o_proj(o.reshape(B, T, self.value_dim))
        if mask is not None:
            o = o * mask[..., None]
        return o, (DeltaNetCache(state, conv_state) if return_cache else None)

    def _heads(self, x: torch.Tensor, head_dim: int) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, head_dim))

    def _qkv(self, x, cache):
        """q, k [B, T, H, K] and v [B, T, H, V] after convolution and feature map; the new conv state."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv_state = None
        if self.use_short_conv:
            previous = (None, None, None) if cache is None else cache.conv_state
            (q, conv_q), (k, conv_k), (v, conv_v) = (
                conv(t, s) for conv, t, s in zip((self.q_conv1d, self.k_conv1d, self.v_conv1d), (q, k, v), previous)
            )
            conv_state = (conv_q, conv_k, conv_v)
        else:
            if self.qk_activation == "silu":
                q, k = F.silu(q), F.silu(k)
            v = F.silu(v)
        q, k, v = self._heads(q, self.head_k_dim), self._heads(k, self.head_k_dim), self._heads(v, self.head_v_dim)
        if self.qk_activation == "relu":
            q, k = F.relu(q), F.relu(k)
        elif self.qk_activation == "elu":
            q, k = F.elu(q) + 1, F.elu(k) + 1
        if self.qk_norm == "sum":
            q, k = F.normalize(q, p=1, dim=-1, eps=SUM_NORM_EPS), F.normalize(k, p=1, dim=-1, eps=SUM_NORM_EPS)
        return q, k, v, conv_state

    def _beta(self, x: torch.Tensor) -> torch.Tensor:
        """beta [B, T, H] in float32 (float64 for a float64 layer): the rule's numerics run there anyway."""
        acc = torch.promote_types(x.dtype, torch.float32)
        if not self.use_beta:
            return x.new_ones(x.shape[:2] + (self.num_heads,), dtype=acc)
        beta = self.b_proj(x).to(acc).sigmoid()
        return 2 * beta if self.allow_neg_eigval else beta

    def _check_inputs(self, x, attention_mask, cache) -> torch.Tensor | None:
        """Argument checks before any compute; returns the mask [B, T] in x's dtype, or None."""
        check_hidden_states(x, self.hidden_size)
        B, T, _ = x.shape
        if cache is not None:
            self._check_cache(cache, x)
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError("attention_mask must be a [B, T] tensor of 0 (padding) and 1 (token)")
        if attention_mask.shape[0] != B or attention_mask.shape[1] < T:
            raise ValueError(f"attention_mask must be [B, T] = {(B, T)} (or wider), got {tuple(attention_mask.shape)}")
        if attention_mask.device != x.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but hidden_states is on {x.device}")
        return attention_mask[:, -T:].to(x.dtype)

    def _check_cache(self, cache, x) -> None:
        if not isinstance(cache, DeltaNetCache):
            raise TypeError(f"cache must be a DeltaNetCache (from this layer's use_cache=True), got {type(cache).__name__}")
        B = x.shape[0]
        want = (B, self.num_heads, self.head_k_dim, self.head_v_dim)
        state = cache.recurrent_state
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != want:
            got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(f"cache.recurrent_state must be [B, H, K, V] = {want}, got {got}")
        if not self.use_short_conv:
            if cache.conv_state is not None:
                raise ValueError("cache.conv_state must be None for a layer without short convolution")
            return
        if cache.conv_state is None or len(cache.conv_state) != 3:
            raise ValueError("cache.conv_state must hold the q, k and v convolution states")
        for name, s, dim in zip("qkv", cache.conv_state, (self.key_dim, self.key_dim, self.value_dim)):
            want = (B, self.conv_size - 1, dim)
            if not isinstance(s, torch.Tensor) or tuple(s.shape) != want:
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"cache.conv_state ({name}) must be [B, conv_size - 1, D] = {want}, got {got}")


def _expanded(hidden_size: int, expand: float, name: str) -> int:
    dim = hidden_size * expand
    if not math.isclose(dim, round(dim)) or round(dim) < 1:
        raise ValueError(f"hidden_size * {name} must be a positive integer, got {hidden_size} * {expand} = {dim}")
    return round(dim)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
