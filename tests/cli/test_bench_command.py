"""`deltaflex bench` as a user sees it: a progress line before and after each contender, the table,
the figures in --out's bench.json, and library warnings kept out of the progress lines."""

import json
import warnings

from typer.testing import CliRunner

import deltaflex.bench
from deltaflex.bench import Contender, deltaflex_contender, fla_contenders, starting
from deltaflex.cli import app

runner = CliRunner()
EAGER = ["bench", "--device", "cpu", "--shape", "1,24,2,8", "--plan", "eager", "--no-compile-checks", "--no-transformers"]


def lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines()]


def test_progress_lines_and_table_on_the_terminal_figures_in_the_json(tmp_path):
    result = runner.invoke(app, [*EAGER, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = lines(result.output)
    assert "1x24x2x8 deltaflex[eager]: first call..." in out and "1x24x2x8 sdpa causal: first call..." in out
    done = [line for line in out if line.startswith("1x24x2x8 deltaflex[eager]: fwd ")]
    assert len(done) == 1 and "fwd+bwd" in done[0] and "err " in done[0]
    assert out.index("1x24x2x8 deltaflex[eager]: first call...") < out.index(done[0])
    assert not any(line.startswith("{") for line in out)  # no JSON on the terminal
    assert any("delta rule benchmark" in line for line in out)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [r["contender"] for r in saved["rows"]] == ["deltaflex[eager]", "sdpa causal"]
    assert saved["rows"][0]["rel_err"] < 1e-4 and saved["warnings"] == []


def _warning_measure(monkeypatch):
    measure = deltaflex.bench.measure

    def warns(contender, *args):
        warnings.warn("Inductor says something", FutureWarning)
        return measure(contender, *args)

    monkeypatch.setattr(deltaflex.bench, "measure", warns)


def test_warnings_go_to_the_json_with_out(tmp_path, monkeypatch):
    _warning_measure(monkeypatch)
    result = runner.invoke(app, [*EAGER, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Inductor says something" not in result.output
    assert "1 distinct warning(s)" in result.output
    assert json.loads((tmp_path / "bench.json").read_text())["warnings"] == ["FutureWarning: Inductor says something"]


def test_warnings_come_once_after_the_table_without_out(monkeypatch):
    _warning_measure(monkeypatch)
    result = runner.invoke(app, EAGER)
    assert result.exit_code == 0, result.output
    out = lines(result.output)
    table = next(i for i, line in enumerate(out) if "delta rule benchmark" in line)
    shown = [i for i, line in enumerate(out) if "Inductor says something" in line]
    assert len(shown) == 1 and shown[0] > table  # two contenders warned: one distinct warning


def test_a_first_call_that_compiles_says_so_before_it_starts(monkeypatch):
    def fake_measure(contender, x, o_ref, device):
        return {"contender": contender.name, "fwd_ms": 1.0, "fwd_bwd_ms": 2.0, "first_call_s": 60.0}

    monkeypatch.setattr(deltaflex.bench, "measure", fake_measure)  # no CPU compile in the tests
    result = runner.invoke(app, ["bench", "--device", "cpu", "--shape", "1,24,2,8", "--plan", "compiled",
                                 "--no-compile-checks", "--no-check", "--no-transformers"])
    assert result.exit_code == 0, result.output
    out = lines(result.output)
    start = out.index("1x24x2x8 deltaflex[compiled]: first call (torch.compile compiles the plan)...")
    assert start < out.index("1x24x2x8 deltaflex[compiled]: fwd 1.000 ms, fwd+bwd 2.000 ms, first call 60.0 s")


def test_first_call_notes():
    shape = deltaflex.bench.Shape(4, 4096, 16, 128, 128)
    assert starting(shape, deltaflex_contender("eager")) == "4x4096x16x128 deltaflex[eager]: first call..."
    assert "Triton compiles the kernels" in starting(shape, deltaflex_contender("fused"))
    assert "torch.compile compiles the plan, Triton its kernels" in starting(shape, deltaflex_contender("mixed-state"))
    assert "(compiles)" in starting(shape, Contender("other", lambda *a: None, compiles=True))
    for c in fla_contenders():  # where fla is installed
        assert "autotunes" in starting(shape, c)


def test_compare_says_what_its_first_calls_do(monkeypatch):
    def fake_measure(contender, x, o_ref, device):
        return {"contender": contender.name, "fwd_ms": 1.0, "fwd_bwd_ms": 2.0, "first_call_s": 100.0, "rel_err": 1e-7}

    monkeypatch.setattr(deltaflex.bench, "measure", fake_measure)
    result = runner.invoke(app, ["compare", "--device", "cpu", "--shape", "1,40,2,16", "--plan", "compiled",
                                 "--no-transformers"])
    assert result.exit_code == 0, result.output
    out = lines(result.output)
    start = out.index("1x40x2x16 deltaflex[compiled]: first call (torch.compile compiles the plan)...")
    assert start < out.index("1x40x2x16 deltaflex[compiled]: fwd 1.000 ms, fwd+bwd 2.000 ms, err 1.0e-07, first call 100.0 s")
