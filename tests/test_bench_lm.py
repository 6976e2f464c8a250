"""benchmarks/bench_lm.py runs end to end at a tiny size on CPU: rows per (model, T), accumulated across
calls, in the decisive order, the fla peer swapped in (a stand-in fla here, never the real one)."""

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from deltaflex.layers import DeltaNet

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lm.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_lm", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


class FakeFlaDeltaNet(DeltaNet):
    """fla 0.6.0's DeltaNet layer contract (constructor, forward, (o, None, past_key_values)) over our layer."""

    made: list[dict] = []

    def __init__(self, mode="chunk", d_model=None, hidden_size=1024, expand_k=1.0, expand_v=1.0, num_heads=4,
                 use_beta=True, use_gate=False, use_short_conv=True, conv_size=4, conv_bias=False,
                 allow_neg_eigval=False, layer_idx=None, qk_activation="silu", qk_norm="l2", norm_eps=1e-5, **kwargs):
        assert not kwargs and d_model is None
        FakeFlaDeltaNet.made.append(dict(mode=mode, hidden_size=hidden_size, num_heads=num_heads, expand_k=expand_k,
                                         expand_v=expand_v, use_beta=use_beta, use_gate=use_gate,
                                         use_short_conv=use_short_conv, conv_size=conv_size, conv_bias=conv_bias,
                                         allow_neg_eigval=allow_neg_eigval, layer_idx=layer_idx,
                                         qk_activation=qk_activation, qk_norm=qk_norm, norm_eps=norm_eps))
        super().__init__(hidden_size, num_heads, expand_k, expand_v, use_beta, use_short_conv, conv_size, conv_bias,
                         use_gate, qk_activation, qk_norm, allow_neg_eigval, norm_eps, mode)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, **kwargs):
        o, _ = super().forward(hidden_states, attention_mask)
        return o, None, past_key_values


@pytest.fixture
def fake_fla(monkeypatch):
    FakeFlaDeltaNet.made = []
    layers = types.ModuleType("fla.layers")
    layers.DeltaNet = FakeFlaDeltaNet
    fla = types.ModuleType("fla")
    fla.layers, fla.__version__ = layers, "fake"
    monkeypatch.setitem(sys.modules, "fla", fla)
    monkeypatch.setitem(sys.modules, "fla.layers", layers)
    return FakeFlaDeltaNet


def test_seq_list_batches_and_row_order():
    bench = load()
    args = bench.parse_args(["--seq", "2048,4096,8192", "--device", "cpu"])
    assert args.seqs == [2048, 4096, 8192] and args.batches == {2048: 16, 4096: 8, 8192: 4}
    assert bench.parse_args(["--seq", "4096", "--batch", "2", "--device", "cpu"]).batches == {4096: 2}
    assert bench.parse_args(["--quick", "--seq", "32,64", "--device", "cpu"]).batches == {32: 4, 64: 2}
    order = bench.row_order(list(bench.MODELS), [2048, 4096, 8192])
    assert order[:6] == [("deltanet", 8192), ("transformer", 8192), ("deltanet-fla", 8192),
                         ("deltanet", 4096), ("transformer", 4096), ("deltanet-fla", 4096)]
    assert {m for m, _ in order[6:10]} == {"hybrid-sliding-window", "hybrid-global-attention"}
    assert {T for _, T in order[6:10]} == {8192, 4096} and {T for _, T in order[10:]} == {2048}


def test_bad_options_name_the_option(capsys):
    bench = load()
    for bad, message in (
        (["--models", "mamba"], "--models must be"),
        (["--steps", "0"], "--steps must be positive"),
        (["--seq", "3000"], "--tokens-per-step = 32768 must be a multiple of every --seq T; [3000]"),
        (["--seq", "2048,4096", "--batch", "2"], "--batch sets the batch of a single T"),
        (["--seq", "4k"], "--seq must be"),
        (["--compile", "graph"], "--compile"),
    ):
        with pytest.raises(SystemExit) as exit_:
            bench.parse_args(bad)
        assert exit_.value.code == 2 and message in capsys.readouterr().err, bad


def test_fla_swap_matches_our_layer_and_runs(tmp_path, fake_fla):
    bench = load()
    args = bench.parse_args(["--quick", "--device", "cpu"])
    ours, peer = bench.build(args, "deltanet"), bench.build(args, "deltanet-fla")
    assert all(isinstance(b.mixer, bench.FlaMixer) and isinstance(b.mixer.layer, fake_fla) for b in peer.blocks)
    assert peer.num_parameters() == ours.num_parameters()
    assert [m["layer_idx"] for m in fake_fla.made] == [0, 1, 2, 3]
    made = fake_fla.made[0]
    assert made["mode"] == "chunk" and made["hidden_size"] == 32 and made["num_heads"] == 2
    assert (made["use_short_conv"], made["conv_size"], made["use_beta"], made["qk_activation"], made["qk_norm"]) == (
        True, 4, True, "silu", "l2")
    assert (made["use_gate"], made["allow_neg_eigval"], made["conv_bias"], made["expand_k"]) == (False, False, False, 1.0)

    rows = bench.main(["--quick", "--models", "deltanet,deltanet-fla", "--seq", "32,64", "--out", str(tmp_path)])
    assert [(r["model"], r["seq"], r["batch"]) for r in rows] == [
        ("deltanet", 64, 2), ("deltanet-fla", 64, 2), ("deltanet", 32, 4), ("deltanet-fla", 32, 4)]
    assert not [r for r in rows if "error" in r or "skipped" in r]
    assert rows[1]["mixers"] == ["fla-deltanet"] * 4 and rows[1]["params_M"] == rows[0]["params_M"]
    saved = json.loads((tmp_path / "bench_lm.json").read_text())
    assert len(saved["rows"]) == 4 and saved["env"]["fla"] == "fake"
    assert all(r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["first_steps_s"] >= 0 for r in rows)
    deltanet_line = next(line for line in bench.table(rows).splitlines() if line.startswith("deltanet  "))
    assert deltanet_line.split()[7] != "-"  # the ratio against the fla peer


def test_rows_accumulate_skips_listed(tmp_path, capsys, monkeypatch):
    bench = load()
    monkeypatch.setitem(sys.modules, "fla", None)  # fla not importable
    rows = bench.main(["--quick", "--models", "transformer,deltanet-fla,hybrid-global-attention", "--out", str(tmp_path)])
    assert [r["model"] for r in rows] == ["transformer", "deltanet-fla", "hybrid-global-attention"]
    assert rows[1]["skipped"].startswith("fla is not importable") and "error" not in rows[2]
    assert rows[2]["mixers"] == ["deltanet", "attention", "attention", "deltanet"]
    assert "vs transf" in capsys.readouterr().out
    rows = bench.main(["--quick", "--max-minutes", "0", "--out", str(tmp_path)])
    assert all("skipped" in r for r in rows) and len(rows) == len(bench.MODELS)
    assert "skipped, the --max-minutes budget is spent" in capsys.readouterr().out
    saved = json.loads((tmp_path / "bench_lm.json").read_text())["rows"]
    measured = {r["model"] for r in saved.values() if "tokens_per_s" in r}
    assert measured == {"transformer", "hybrid-global-attention"}  # a budget skip keeps an earlier measurement
