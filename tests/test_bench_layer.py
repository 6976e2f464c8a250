"""benchmarks/bench_layer.py runs end to end at a tiny size on CPU (the GPU run gets one shot)."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_layer.py"


def test_bench_layer_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_layer", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--no-compile", "--no-fla", "--out", str(tmp_path)])
    assert not [r for r in rows if "error" in r]
    assert {r["part"] for r in rows} == {"layer check", "decode check", "decode", "layer_decode", "layer"}
    saved = json.loads((tmp_path / "bench_layer.json").read_text())
    assert len(saved["rows"]) == len(rows)
    checks = [r for r in rows if r["part"] == "layer check"]
    assert checks and all(r["rel_err_o"] < 2e-2 and r["rel_err_grads_max"] < 2e-2 for r in checks)
    assert all(r["rel_err_o"] < 1e-2 and r["rel_err_state"] < 1e-2 for r in rows if r["part"] == "decode")
