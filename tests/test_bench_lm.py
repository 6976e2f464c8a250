"""benchmarks/bench_lm.py runs end to end at a tiny size on CPU, and accumulates its rows across calls."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lm.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_lm", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_lm_smoke(tmp_path):
    bench = load()
    rows = bench.main(["--quick", "--models", "deltanet,hybrid-global-attention", "--out", str(tmp_path)])
    assert [r["model"] for r in rows] == ["deltanet", "hybrid-global-attention"]
    assert not [r for r in rows if "error" in r]
    assert rows[1]["mixers"] == ["deltanet", "attention", "attention", "deltanet"]
    assert all(r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["params_M"] > 0 for r in rows)
    rows = bench.main(["--quick", "--models", "transformer,hybrid-sliding-window", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_lm.json").read_text())["rows"]
    assert sorted(r["model"] for r in saved.values()) == sorted(bench.MODELS)  # two calls, one file
    assert "transformer" in bench.table(list(saved.values()))


def test_bench_lm_budget_and_bad_arguments(tmp_path, capsys):
    bench = load()
    assert bench.main(["--quick", "--max-minutes", "0", "--out", str(tmp_path)]) == []
    assert "skipped, the --max-minutes budget is spent" in capsys.readouterr().out
    for bad, message in ((["--models", "mamba"], "--models must be"), (["--steps", "0"], "--steps must be positive")):
        with pytest.raises(SystemExit) as exit_:
            bench.parse_args(bad)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
