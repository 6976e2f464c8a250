"""`deltaflex mqar` on CPU at the tiny --quick size: JSON written, table printed, calls accumulate,
a grid over --pairs x --seq-lens, two worker processes writing one JSON, bad options rejected before
any training."""

import json
import sys

import pytest
from typer.testing import CliRunner

from deltaflex.cli import app

runner = CliRunner()
def plain(output: str) -> str:
    """The output without rich's error box, whose borders cut wrapped lines."""
    return " ".join(output.replace("│", " ").split())


QUICK = ["mqar", "--quick", "--device", "cpu", "--no-plot", "--steps", "4", "--eval-every", "2"]


def test_quick_run_writes_results_and_a_second_call_adds_to_them(tmp_path):
    result = runner.invoke(app, [*QUICK, "--mixers", "linear", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "MQAR accuracy" in result.output and "linear" in result.output
    runs = json.loads((tmp_path / "mqar.json").read_text())["runs"]
    assert list(runs) == ["p8/s64/linear/d32/lr0.003"] and runs["p8/s64/linear/d32/lr0.003"]["steps_done"] == 4
    result = runner.invoke(app, [*QUICK, "--mixers", "linear,attention", "--lr", "attention=1e-3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "p8/s64/linear/d32/lr0.003: complete" in result.output
    saved = json.loads((tmp_path / "mqar.json").read_text())
    assert sorted(saved["runs"]) == ["p8/s64/attention/d32/lr0.001", "p8/s64/linear/d32/lr0.003"]
    assert saved["settings"]["task"] == {"vocab_size": 64, "power_a": 0.01, "random_fill": False}
    assert saved["env"]["torch"]


def test_budget_left_runs_are_named(tmp_path):
    result = runner.invoke(app, [*QUICK, "--mixers", "attention", "--max-minutes", "1e-9", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "not started" in result.output and "not complete yet: p8/s64/attention/d32/lr0.003" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mixers", "mamba"], "expected a comma-separated subset"),
        (["--widths", "32,x"], "expected comma-separated positive integers"),
        (["--lr", "gla=1e-3"], "expected LR or MIXER=LR"),
        (["--lr", "-1"], "expected LR or MIXER=LR"),
        (["--plan", "fast"], "expected one of"),
        (["--max-minutes", "0"], "expected a positive number of minutes"),
        (["--heads", "3"], "--heads 3 must divide every width"),
        (["--workers", "0"], "expected a positive number of worker processes"),
        (["--pairs", "4,0"], "expected comma-separated positive integers"),
        (["--num-pairs", "0"], "expected a positive integer, got 0"),
        (["--pairs", "4", "--num-pairs", "4"], "give --pairs or --num-pairs, not both"),
        (["--pairs", "4,40"], "40 pairs need a vocabulary of at least 82"),
        (["--pairs", "4,20", "--seq-lens", "32,64"], "20 pairs need a sequence of at least 4 * 20 = 80 tokens"),
    ],
)
def test_bad_options(tmp_path, args, message):
    result = runner.invoke(app, [*QUICK, *args, "--out", str(tmp_path)])
    assert result.exit_code != 0 and message in plain(result.output), result.output
    assert not (tmp_path / "mqar.json").exists()


def test_bad_task_sizes_name_the_option(tmp_path):
    result = runner.invoke(app, ["mqar", "--device", "cpu", "--no-plot", "--seq-len", "100", "--out", str(tmp_path)])
    output = plain(result.output)
    assert result.exit_code == 2 and "Invalid value for --num-pairs" in output, output
    assert "64 pairs need a sequence of at least 4 * 64 = 256 tokens" in output and "longest --seq-len (100)" in output


def test_a_grid_in_two_workers_fills_one_file(tmp_path):
    grid = ["--pairs", "2,8", "--seq-lens", "16,32", "--widths", "8", "--mixers", "linear-noconv"]
    result = runner.invoke(app, [*QUICK, *grid, "--steps", "2", "--workers", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "left out of the grid, sequences too short for their pairs: p8/s16" in result.output
    saved = json.loads((tmp_path / "mqar.json").read_text())
    keys = [f"p{p}/s{s}/linear-noconv/d8/lr0.003" for p, s in ((2, 16), (2, 32), (8, 32))]
    assert sorted(saved["runs"]) == sorted(keys)
    assert all(r["complete"] and len(r["curve"]) == 1 for r in saved["runs"].values())
    result = runner.invoke(app, [*QUICK, *grid, "--steps", "2", "--workers", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0 and all(f"{k}: complete in" in result.output for k in keys), result.output


def test_plot_without_matplotlib_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = runner.invoke(app, ["mqar", "--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "needs matplotlib" in result.output
    assert not (tmp_path / "mqar.json").exists()


def test_plot_title_fits_the_figure(tmp_path):
    """One width is the narrowest figure: the title wraps instead of running past its edges, and
    stays clear of the panel's own title."""
    from deltaflex.models.mqar_sweep import curves_figure

    result = runner.invoke(app, [*(a for a in QUICK if a != "--no-plot"), "--mixers", "linear", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mqar.png").stat().st_size > 0
    fig = curves_figure(json.loads((tmp_path / "mqar.json").read_text()))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)  # matplotlib has no public getter for the Text
    assert "vocabulary 64" in fig.get_suptitle()
    assert 0 <= title.x0 and title.x1 <= fig.bbox.width and title.y1 <= fig.bbox.height
    assert title.y0 >= fig.axes[0].title.get_window_extent(renderer).y1


def test_a_run_still_learning_at_its_end_is_warned_about(tmp_path, monkeypatch):
    import deltaflex.models.mqar as mqar

    monkeypatch.setattr(mqar, "still_moving", lambda curve, steps: 0.25)  # as if it rose by 0.25 at the end
    result = runner.invoke(app, [*QUICK, "--mixers", "linear", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "warning: p8/s64/linear/d32/lr0.003: its test accuracy still moved by +0.250" in " ".join(result.output.split())
    monkeypatch.setattr(mqar, "still_moving", lambda curve, steps: None)
    result = runner.invoke(app, [*QUICK, "--mixers", "linear", "--fresh", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
