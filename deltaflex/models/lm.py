"""`CausalLM`: a plain-PyTorch causal language model whose token mixer is chosen per layer.

    tokens -> embedding -> L x [x + mixer(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> head
Mixers (`LMConfig.mixers`): DeltaNet, global or sliding-window attention, linear attention. The head
is tied to the embedding or not. `forward(input_ids, cache=None, use_cache=False)` returns
(logits, cache or None), as the layers do; the cache is a tuple with one entry a layer
(`DeltaNetCache`, `KVCache`, `LinearAttentionCache`), so `generate()` prefills once and then feeds
one token at a time. Initialisation: N(0, 0.02) for linear and embedding weights, the residual
output projections scaled down by sqrt(2 L) (GPT-2's), convolutions and norms as their layers set.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import DeltaNet
from ..layers.norm import RMSNorm
from ..plan import Plan
from .attention import Attention
from .config import LMConfig
from .linear_attention import LinearAttention


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LMConfig, mixer: str, plan: str | Plan | None):
        super().__init__()
        h, heads = config.hidden_size, config.num_heads
        self.mixer_norm = RMSNorm(h, eps=config.norm_eps)
        if mixer == "deltanet":
            self.mixer = DeltaNet(h, heads, norm_eps=config.norm_eps, plan=plan, **config.deltanet)
        elif mixer == "linear":
            self.mixer = LinearAttention(h, heads, norm_eps=config.norm_eps, **config.linear)
        else:
            window = config.window_size if mixer == "sliding_window" else None
            self.mixer = Attention(h, heads, window, config.rope_theta, config.attention_backend)
        self.mlp_norm = RMSNorm(h, eps=config.norm_eps)
        self.mlp = SwiGLU(h, config.mlp_size)

    def forward(self, x, cache=None, use_cache=False):
        o, cache = self.mixer(self.mixer_norm(x), cache=cache, use_cache=use_cache)
        x = x + o
        return x + self.mlp(self.mlp_norm(x)), cache


class CausalLM(nn.Module):
    def __init__(self, config: LMConfig, plan: str | Plan | None = None):
        """plan: the DeltaNet layers' delta-rule plan (None: the library default, "auto" on CUDA)."""
        super().__init__()
        if not isinstance(config, LMConfig):
            raise TypeError(f"config must be an LMConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, m, plan) for m in config.mixers)
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
        for block in self.blocks:  # keep the residual stream's variance from growing with depth
            for proj in (block.mixer.o_proj, block.mlp.down_proj):
                nn.init.normal_(proj.weight, std=std / math.sqrt(2 * self.config.num_layers))
        if self.config.tie_embeddings:
            self.head.weight = self.embed.weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights count once

    def forward(
        self, input_ids: torch.Tensor, cache: tuple | None = None, use_cache: bool = False
    ) -> tuple[torch.Tensor, tuple | None]:
        """input_ids [B, T] -> (logits [B, T, vocab_size] in float32, cache or None)."""
        hidden, cache = self.hidden_states(input_ids, cache, use_cache)
        return self.head(hidden).float(), cache

    def hidden_states(
        self, input_ids: torch.Tensor, cache: tuple | None = None, use_cache: bool = False
    ) -> tuple[torch.Tensor, tuple | None]:
        """The final-normed hidden states [B, T, hidden_size] (the head's input), and the cache.
        Training on a few positions (MQAR) applies `head` to those only."""
        self._check_inputs(input_ids, cache)
        x = self.embed(input_ids)
        return_cache = use_cache or cache is not None
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(x, cache=None if cache is None else cache[i], use_cache=return_cache)
            new_cache.append(layer_cache)
        return self.norm(x), (tuple(new_cache) if return_cache else None)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
    ):
        """Continues each row of input_ids [B, T] by max_new_tokens tokens, with the cache: one
        prefill, then one token a step. temperature 0 is greedy; otherwise sampling from
        softmax(logits / temperature), restricted to the top_k tokens when given.

        Returns tokens [B, T + max_new_tokens]; with return_logits, also the logits each new token
        was drawn from, [B, max_new_tokens, vocab_size].
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= self.config.vocab_size):
            raise ValueError(f"top_k must be None or an integer in [1, vocab_size], got {top_k!r}")
        tokens, all_logits = input_ids, []
        logits, cache = self(input_ids, use_cache=True)
        for i in range(max_new_tokens):
            last = logits[:, -1]
            all_logits.append(last)
            next_token = _pick(last, temperature, top_k, generator)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if i + 1 < max_new_tokens:
                logits, cache = self(next_token[:, None], cache=cache)
        return (tokens, torch.stack(all_logits, dim=1)) if return_logits else tokens

    def _check_inputs(self, input_ids, cache) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be [B, T] with T >= 1, got {shape}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
        if cache is not None and (not isinstance(cache, (tuple, list)) or len(cache) != self.config.num_layers):
            raise ValueError(f"cache must be the tuple of {self.config.num_layers} layer caches this model returned")


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
