import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from deltaflex import Plan
from deltaflex.cli import app
from deltaflex.cli.compare import plot_rows
from deltaflex.tuning.cache import Entry, PlanCache
from deltaflex.tuning.key import CacheKey, environment

runner = CliRunner()
SHAPE = ["--device", "cpu", "--shape", "1,40,2,16", "--no-transformers"]


def test_compare_times_and_checks_every_plan(tmp_path):
    result = runner.invoke(app, ["compare", *SHAPE, "--plan", "eager", "--plan", "auto", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "deltaflex[eager]" in result.output and "deltaflex[auto]" in result.output  # not taken for markup
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert [r["contender"] for r in rows] == ["deltaflex[eager]", "deltaflex[auto]"]
    assert [r["plan"] for r in rows] == ["C64 eager", "C32 eager"]  # auto: the CPU default for head dim 16
    for r in rows:
        assert r["rel_err"] < 1e-4 and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
    assert rows[0]["speedup_fwd"] == 1.0 and rows[1]["speedup_fwd_bwd"] > 0  # against the first plan


@pytest.mark.compile
def test_compare_includes_transformers_fallback_where_installed(tmp_path):
    pytest.importorskip("transformers")
    result = runner.invoke(app, ["compare", "--device", "cpu", "--shape", "1,40,2,16,8", "--plan", "eager",
                                 "--threads", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert [r["contender"] for r in rows] == ["deltaflex[eager]", "transformers fallback",
                                              "transformers fallback compiled"]
    for r in rows[1:]:
        assert r["rel_err"] < 1e-4 and r["plan"].startswith("torch fallback of transformers")


def test_compare_adds_the_tuned_plan_by_default(tmp_path, monkeypatch):
    key = CacheKey.for_shape(environment("cpu"), torch.float32, 1, 40, 2, 16, 16)
    tuned = Plan(chunk_size=16, compile=False)
    PlanCache().save(Entry(key, tuned, 1.0, 2.0, "fwdbwd", "1x40x2x16", 1e-7, 3, "2026-11-28T00:00:00Z"))
    monkeypatch.setattr("deltaflex.cli.compare._default_plan_names", lambda device_type: ["eager"])  # no CPU compiles here
    result = runner.invoke(app, ["compare", *SHAPE, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert [(r["contender"], r["plan"]) for r in rows] == [("deltaflex[eager]", "C64 eager"), ("deltaflex[auto]", "C16 eager")]


def test_a_wrong_plan_fails_the_comparison(monkeypatch):
    import deltaflex.bench

    real = deltaflex.bench.delta_rule
    monkeypatch.setattr(deltaflex.bench, "delta_rule", lambda *a, **k: (real(*a, **k)[0] * 1.1, None))
    result = runner.invoke(app, ["compare", *SHAPE, "--plan", "eager"])
    assert result.exit_code == 1 and "exceeded the" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--plan", "fastest"], "expected one of"),
        (["--plan", "triton"], "cannot run here"),
        (["--plan", "mixed-state"], "cannot run here"),
        (["--shape", "1,2,3"], "B,T,H,K"),
        (["--dtype", "fp8"], "expected one of"),
        (["--device", "gpu"], "expected cuda, cuda:N or cpu"),
    ],
)
def test_compare_rejects_bad_arguments(args, message, monkeypatch):
    monkeypatch.setattr("deltaflex.plan.triton_device_types", lambda: ("cuda",))  # a CPU without Triton's interpreter
    result = runner.invoke(app, ["compare", "--device", "cpu", "--shape", "1,40,2,16", *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_plot_without_matplotlib_fails_before_measuring(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    result = runner.invoke(app, ["compare", *SHAPE, "--plan", "eager", "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 1 and "needs matplotlib" in result.output
    assert "deltaflex[eager]" not in result.output


def test_plot_draws_every_contender(tmp_path):
    import matplotlib  # noqa: F401  (a test extra: `pip install -e .[test]`)
    rows = [{"shape": s, "contender": c, "fwd_ms": 1.0 + i, "fwd_bwd_ms": 2.0 + i}
            for i, (s, c) in enumerate([("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")])]
    rows.append({"shape": "b", "contender": "z", "error": "out of memory"})
    plot_rows(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_compare_help():
    result = runner.invoke(app, ["compare", "--help"])
    assert result.exit_code == 0 and "--plot" in result.output


@pytest.mark.gpu
def test_compare_on_cuda(tmp_path):
    result = runner.invoke(app, ["compare", "--device", "cuda", "--shape", "1,256,2,64", "--no-transformers", "--plan", "eager",
                                 "--plan", "auto", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert all(r["rel_err"] < 1e-2 for r in rows if r["contender"].startswith("deltaflex"))
