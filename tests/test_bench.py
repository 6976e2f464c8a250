"""The benchmark runs at a tiny size on CPU, so it cannot rot."""

import json

import pytest
import torch
from typer.testing import CliRunner

from deltaflex.bench import Shape, paper_shapes, run_benchmark
from deltaflex.cli import app


def test_run_benchmark_checks_and_times_every_contender():
    rows = run_benchmark([Shape(1, 40, 2, 16, 8)], ["eager", "eager,chunk_size=16,state_group=2"], device="cpu",
                         dtype=torch.float32, log=lambda _: None, transformers=False)
    by_name = {r["contender"]: r for r in rows}
    assert set(by_name) == {"deltaflex[eager]", "deltaflex[eager,chunk_size=16,state_group=2]", "sdpa causal"}
    assert by_name["deltaflex[eager]"]["rel_err"] < 1e-4
    assert by_name["deltaflex[eager,chunk_size=16,state_group=2]"]["rel_err"] < 1e-4
    assert "rel_err" not in by_name["sdpa causal"]  # attention computes another function: timed only
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["shape"] == "1x40x2x16x8"


@pytest.mark.compile
def test_run_benchmark_times_transformers_fallback_where_installed():
    pytest.importorskip("transformers")
    torch._dynamo.reset()  # the compiled peer's graphs counted from none (another test may have built them)
    rows = run_benchmark([Shape(1, 40, 2, 16, 8)], ["eager"], device="cpu", dtype=torch.float32,
                         log=lambda _: None, threads=2)
    by_name = {r["contender"]: r for r in rows}
    assert set(by_name) == {"deltaflex[eager]", "transformers fallback", "transformers fallback compiled",
                            "sdpa causal"}
    for name in ("transformers fallback", "transformers fallback compiled"):
        row = by_name[name]
        assert row["rel_err"] < 1e-4 and row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["threads"] == 2
        assert row["note"].startswith("torch fallback of transformers")
    assert by_name["transformers fallback compiled"]["graphs_compiled"] >= 1


def test_shapes():
    assert Shape.parse("2,64,4,32") == Shape(2, 64, 4, 32, 32)
    assert str(Shape.parse("2,64,4,32,16")) == "2x64x4x32x16"
    for bad in ("2,64,4", "a,b,c,d", "2,0,4,32"):
        with pytest.raises(ValueError, match="B,T,H,K"):
            Shape.parse(bad)
    assert len(paper_shapes()) == 9 and all(s.H * s.K == 2048 and s.B * s.T == 16384 for s in paper_shapes())


def test_cli_bench_on_cpu(tmp_path):
    result = CliRunner().invoke(
        app, ["bench", "--device", "cpu", "--shape", "1,24,2,8", "--plan", "eager", "--no-transformers", "--out",
              str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "deltaflex[eager]" in result.output
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"][0]["rel_err"] < 1e-4


@pytest.mark.parametrize("args,message", [(["--shape", "1,2"], "B,T,H,K"), (["--dtype", "int8"], "expected one of"),
                                          (["--plan", "state_group=3"], "state_group")])
def test_cli_bench_rejects_bad_arguments(args, message):
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", *args])
    assert result.exit_code != 0 and message in result.output


def test_cli_info():
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0 and "torch" in result.output
