"""LMConfig: JSON round trip, presets' layer layouts, and clear errors for bad values."""

import json

import pytest

from deltaflex.models import MIXERS, PRESETS, LMConfig, preset


def test_json_round_trip_through_string_and_file(tmp_path):
    config = LMConfig(
        vocab_size=100,
        hidden_size=48,
        mixers=("deltanet", "sliding_window", "linear", "attention"),
        num_heads=3,
        window_size=7,
        intermediate_size=96,
        tie_embeddings=False,
        rope_theta=500.0,
        attention_backend="flex",
        deltanet={"use_gate": True, "conv_size": 2},
        linear={"use_short_conv": False},
    )
    assert LMConfig.from_json(config.to_json()) == config
    config.to_json(tmp_path / "config.json")
    assert LMConfig.from_json(tmp_path / "config.json") == config
    assert LMConfig.from_json(str(tmp_path / "config.json")) == config
    data = json.loads(config.to_json())
    assert data["mixers"] == ["deltanet", "sliding_window", "linear", "attention"]  # plain JSON values
    assert LMConfig.from_dict(data).mixers == config.mixers  # a list comes back as the tuple


def test_derived_sizes():
    config = LMConfig(hidden_size=768, num_heads=12, mixers=["deltanet"] * 3)
    assert (config.num_layers, config.head_dim, config.mlp_size) == (3, 64, 2048)  # 8/3 * 768 = 2048
    assert LMConfig(hidden_size=64, num_heads=2).mlp_size == 256  # 170 rounded up to a multiple of 256
    assert LMConfig(intermediate_size=100).mlp_size == 100


@pytest.mark.parametrize("layers", [4, 6, 12])
def test_presets_lay_out_the_papers_models(layers):
    assert preset("deltanet", layers).mixers == ("deltanet",) * layers
    assert preset("linear", layers).mixers == ("linear",) * layers
    assert preset("transformer", layers).mixers == ("attention",) * layers
    swa = preset("hybrid-sliding-window", layers).mixers
    assert swa[0::2] == ("deltanet",) * (layers // 2) and swa[1::2] == ("sliding_window",) * (layers // 2)
    global_ = preset("hybrid-global-attention", layers).mixers
    assert [i for i, m in enumerate(global_) if m == "attention"] == [1, layers // 2]  # the 2nd and (L/2 + 1)-th
    assert set(global_) == {"deltanet", "attention"}
    assert set(PRESETS) == {"deltanet", "linear", "transformer", "hybrid-sliding-window", "hybrid-global-attention"}


def test_preset_passes_fields_and_defaults_to_a_125m_shape():
    config = preset("hybrid-sliding-window", 4, hidden_size=64, num_heads=2, window_size=16)
    assert (config.hidden_size, config.num_heads, config.window_size) == (64, 2, 16)
    default = preset("transformer")
    assert (default.hidden_size, default.num_layers, default.vocab_size) == (768, 12, 32000)


@pytest.mark.parametrize(
    "fields, error, message",
    [
        ({"vocab_size": 0}, ValueError, "vocab_size must be a positive integer"),
        ({"hidden_size": 64.0}, ValueError, "hidden_size must be a positive integer"),
        ({"num_heads": 5}, ValueError, "num_heads = 5 must divide hidden_size = 768"),
        ({"window_size": -1}, ValueError, "window_size must be a positive integer"),
        ({"intermediate_size": 0}, ValueError, "intermediate_size must be a positive integer"),
        ({"mixers": ()}, ValueError, "mixers must be a non-empty list"),
        ({"mixers": ("deltanet", "mamba")}, ValueError, r"mixers must each be one of .* got \['mamba'\]"),
        ({"mixers": "deltanet"}, ValueError, "mixers must be a non-empty list"),
        ({"attention_backend": "flash"}, ValueError, "attention_backend must be one of"),
        ({"rope_theta": 0}, ValueError, "rope_theta must be a positive number"),
        ({"tie_embeddings": 1}, TypeError, "tie_embeddings must be a bool"),
        ({"deltanet": {"use_gate": True, "colour": 1}}, ValueError, r"deltanet got unknown .*\['colour'\]"),
        ({"deltanet": {"num_heads": 4}}, ValueError, "model-owned arguments"),
        ({"deltanet": [("use_gate", True)]}, TypeError, "deltanet must be a dict"),
        ({"linear": {"norm_eps": 1e-6}}, ValueError, r"linear got unknown or model-owned arguments \['norm_eps'\]"),
        ({"linear": None}, TypeError, "linear must be a dict of LinearAttention arguments"),
    ],
)
def test_bad_values_name_the_field(fields, error, message):
    with pytest.raises(error, match=message):
        LMConfig(**fields)


def test_bad_json_and_preset_arguments():
    with pytest.raises(ValueError, match=r"unknown LMConfig fields \['layers'\]"):
        LMConfig.from_dict({"layers": 3})
    with pytest.raises(TypeError, match="from a dict"):
        LMConfig.from_dict(["deltanet"])
    with pytest.raises(ValueError, match="preset name must be one of"):
        preset("griffin")
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        preset("deltanet", 0)
    with pytest.raises(ValueError, match="needs num_layers >= 4"):
        preset("hybrid-global-attention", 3)
    with pytest.raises(ValueError, match="a preset sets mixers itself"):
        preset("deltanet", 2, mixers=("attention",))
    assert set(MIXERS) == {"deltanet", "attention", "sliding_window", "linear"}
