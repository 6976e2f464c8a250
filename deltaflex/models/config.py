"""`LMConfig`: what a `CausalLM` is made of, as a JSON-serialisable dataclass, and the paper's presets.

A model is a stack of blocks, one token mixer a block, chosen per layer by `mixers`:
  "deltanet"        the DeltaNet layer (`deltaflex.DeltaNet`; extra arguments in `deltanet`)
  "attention"       global causal softmax attention with rotary embeddings
  "sliding_window"  the same, each token seeing the `window_size` most recent tokens (itself included)
  "linear"          linear attention: DeltaNet's projections, convolution, feature map and norms,
                    without the delta rule (S_t = S_{t-1} + k_t v_t^T); extra arguments in `linear`,
                    e.g. {"use_short_conv": False} (the MQAR ablation without the convolution)
Presets (`preset(name)`): "deltanet", "linear", "transformer", and the paper's two hybrids
(Yang et al. 2024, section 5): "hybrid-sliding-window" (sliding-window attention every other layer)
and "hybrid-global-attention" (DeltaNet with global attention in the 2nd and the (L/2 + 1)-th layer).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

from ..validation import config_fields

MIXERS = ("deltanet", "attention", "sliding_window", "linear")
ATTENTION_BACKENDS = ("sdpa", "flex")
PRESETS = ("deltanet", "linear", "transformer", "hybrid-sliding-window", "hybrid-global-attention")
# DeltaNet arguments the model sets itself (the rest may go in LMConfig.deltanet)
_DELTANET_OWNED = {"hidden_size", "num_heads", "norm_eps", "plan", "step_backend", "mode"}
_LINEAR_OWNED = {"hidden_size", "num_heads", "norm_eps"}


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 32000
    hidden_size: int = 768
    mixers: tuple[str, ...] = ("deltanet",) * 12  # one entry a layer
    num_heads: int = 12  # every mixer's heads: head dim = hidden_size / num_heads
    window_size: int = 2048  # of the "sliding_window" layers
    intermediate_size: int | None = None  # SwiGLU width; None: 8/3 hidden rounded up to a multiple of 256
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    attention_backend: str = "sdpa"  # "sdpa" or "flex" (flex_attention, compiled on CUDA)
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    deltanet: dict = dataclasses.field(default_factory=dict)  # more DeltaNet arguments, e.g. {"use_gate": True}
    linear: dict = dataclasses.field(default_factory=dict)  # more LinearAttention arguments

    def __post_init__(self):
        object.__setattr__(self, "mixers", tuple(self.mixers) if isinstance(self.mixers, (list, tuple)) else self.mixers)
        for name in ("vocab_size", "hidden_size", "num_heads", "window_size"):
            _check_positive_int(name, getattr(self, name))
        if self.intermediate_size is not None:
            _check_positive_int("intermediate_size", self.intermediate_size)
        if not isinstance(self.mixers, tuple) or not self.mixers:
            raise ValueError(f"mixers must be a non-empty list of {MIXERS}, got {self.mixers!r}")
        bad = [m for m in self.mixers if m not in MIXERS]
        if bad:
            raise ValueError(f"mixers must each be one of {MIXERS}, got {bad}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads = {self.num_heads} must divide hidden_size = {self.hidden_size}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        for name in ("rope_theta", "norm_eps", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        from ..layers import DeltaNet
        from .linear_attention import LinearAttention

        _check_layer_options("deltanet", self.deltanet, DeltaNet, _DELTANET_OWNED)
        _check_layer_options("linear", self.linear, LinearAttention, _LINEAR_OWNED)

    @property
    def num_layers(self) -> int:
        return len(self.mixers)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 256 * -(-(self.hidden_size * 8 // 3) // 256)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mixers"] = list(self.mixers)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> LMConfig:
        return cls(**config_fields(cls, data, "LMConfig"))

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> LMConfig:
        """From a JSON string, or from a file when given a Path (or a string naming an existing file)."""
        text = str(text_or_path)
        if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))


def preset(name: str, num_layers: int = 12, **fields) -> LMConfig:
    """A config of `num_layers` layers laid out as the preset says; `fields` set the rest
    (defaults: a ~125M model, hidden 768, 12 heads, vocabulary 32000, window 2048)."""
    if name not in PRESETS:
        raise ValueError(f"preset name must be one of {PRESETS}, got {name!r}")
    _check_positive_int("num_layers", num_layers)
    if "mixers" in fields:
        raise ValueError("a preset sets mixers itself; build an LMConfig directly to choose them")
    if name in ("deltanet", "linear"):
        mixers = [name] * num_layers
    elif name == "transformer":
        mixers = ["attention"] * num_layers
    elif name == "hybrid-sliding-window":
        mixers = ["deltanet" if i % 2 == 0 else "sliding_window" for i in range(num_layers)]
    else:
        if num_layers < 4:
            raise ValueError(f"hybrid-global-attention needs num_layers >= 4 (two attention layers), got {num_layers}")
        mixers = ["attention" if i in (1, num_layers // 2) else "deltanet" for i in range(num_layers)]
    return LMConfig(mixers=tuple(mixers), **fields)


def _check_layer_options(name: str, options, layer: type, owned: set[str]) -> None:
    """`options` must be a dict of `layer`'s constructor arguments that the model does not set itself."""
    if not isinstance(options, dict):
        raise TypeError(f"{name} must be a dict of {layer.__name__} arguments, got {type(options).__name__}")
    allowed = set(inspect.signature(layer.__init__).parameters) - {"self"} - owned
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"{name} got unknown or model-owned arguments {sorted(unknown)}; allowed: {sorted(allowed)}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
