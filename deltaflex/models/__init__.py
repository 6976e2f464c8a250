"""Language models built on the DeltaNet layer: per-layer mixers, hybrids, cached generation, MQAR."""

from .attention import Attention, KVCache
from .config import MIXERS, PRESETS, LMConfig, preset
from .linear_attention import LinearAttention, LinearAttentionCache, causal_linear_attention
from .lm import CausalLM
from .mqar import MQARTask, MQARTraining, mqar_batch, mqar_model, train_mqar

__all__ = [
    "MIXERS",
    "PRESETS",
    "Attention",
    "CausalLM",
    "KVCache",
    "LMConfig",
    "LinearAttention",
    "LinearAttentionCache",
    "MQARTask",
    "MQARTraining",
    "causal_linear_attention",
    "mqar_batch",
    "mqar_model",
    "preset",
    "train_mqar",
]
