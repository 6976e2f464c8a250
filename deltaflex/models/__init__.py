"""Language models built on the DeltaNet layer: per-layer mixers, hybrids, cached generation, MQAR."""

from .attention import Attention, KVCache
from .config import MIXERS, PRESETS, LMConfig, preset
from .linear_attention import LinearAttention, LinearAttentionCache, causal_linear_attention
from .lm import CausalLM

__all__ = [
    "MIXERS",
    "PRESETS",
    "Attention",
    "CausalLM",
    "KVCache",
    "LMConfig",
    "LinearAttention",
    "LinearAttentionCache",
    "causal_linear_attention",
    "preset",
]
