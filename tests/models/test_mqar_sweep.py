"""The MQAR sweep: one JSON accumulated across calls, complete runs skipped, other settings refused,
a run cut by the budget kept as incomplete and redone later; the grid's cells in the keys, cheapest
first; worker processes writing the one file; the plot without matplotlib."""

import json
import sys

import pytest

from deltaflex.models import mqar_sweep
from deltaflex.models.mqar import MQARTask, MQARTraining
from deltaflex.models.mqar_sweep import (
    RESULTS_FILE,
    Cell,
    best_runs,
    check_plotting,
    grid_cells,
    plan_runs,
    run_key,
    run_sweep,
    update_results,
)

TASK = MQARTask(vocab_size=32, seq_len=24, num_pairs=4)
CELL = Cell(seq_len=24, num_pairs=4)  # TASK's
TRAINING = MQARTraining(steps=4, batch_size=4, eval_every=2, curve_examples=8, test_examples=8)


def sweep(tmp_path, mixers, widths, lrs, **kwargs):
    logs = []
    results = run_sweep(TASK, TRAINING, mixers, widths, lrs, tmp_path, num_heads=2, log=logs.append, **kwargs)
    return results, logs


def test_runs_accumulate_in_one_file_and_complete_runs_are_skipped(tmp_path):
    results, _ = sweep(tmp_path, ["linear"], [8], {"linear": [1e-3]})
    assert list(results["runs"]) == ["p4/s24/linear/d8/lr0.001"]
    results, logs = sweep(tmp_path, ["linear", "attention"], [8], {"linear": [1e-3, 3e-3], "attention": [1e-3]})
    assert logs[0] == f"p4/s24/linear/d8/lr0.001: complete in {tmp_path / RESULTS_FILE}, skipped"
    saved = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert saved == json.loads(json.dumps(results))
    assert sorted(saved["runs"]) == ["p4/s24/attention/d8/lr0.001", "p4/s24/linear/d8/lr0.001", "p4/s24/linear/d8/lr0.003"]
    assert all(r["complete"] and len(r["curve"]) == 2 for r in saved["runs"].values())
    best = best_runs(saved)
    assert set(best) == {(CELL, "linear", 8), (CELL, "attention", 8)}
    linear = [r for r in saved["runs"].values() if r["mixer"] == "linear"]
    assert best[(CELL, "linear", 8)]["accuracy"] == max(r["accuracy"] for r in linear)


def test_other_settings_are_refused_unless_fresh(tmp_path):
    sweep(tmp_path, ["linear"], [8], {"linear": [1e-3]})
    with pytest.raises(ValueError, match="holds results for other settings"):
        run_sweep(TASK, MQARTraining(steps=5, batch_size=4), ["linear"], [8], {"linear": [1e-3]}, tmp_path, num_heads=2)
    results = run_sweep(
        TASK, MQARTraining(steps=2, batch_size=4, eval_every=2, curve_examples=4, test_examples=4),
        ["attention"], [8], {"attention": [1e-3]}, tmp_path, num_heads=2, fresh=True, log=lambda s: None,
    )
    assert list(results["runs"]) == ["p4/s24/attention/d8/lr0.001"]


def test_budget_cuts_and_a_later_call_redoes_the_run(tmp_path):
    results, logs = sweep(tmp_path, ["linear"], [8, 16], {"linear": [1e-3]}, max_minutes=1e-9)
    assert results["runs"] == {} and all("not started" in line for line in logs)  # nothing fits in no time
    results, _ = sweep(tmp_path, ["linear"], [8], {"linear": [1e-3]})
    key = run_key(CELL, "linear", 8, 1e-3)
    results["runs"][key]["complete"] = False  # as if cut by the budget
    mqar_sweep.save_results(tmp_path, results)
    _, logs = sweep(tmp_path, ["linear"], [8], {"linear": [1e-3]})
    assert "skipped" not in logs[0] and "accuracy" in logs[0]
    assert json.loads((tmp_path / RESULTS_FILE).read_text())["runs"][key]["complete"]


def test_a_run_too_long_for_what_is_left_is_not_started(tmp_path, monkeypatch):
    sweep(tmp_path, ["linear"], [8], {"linear": [1e-3]})
    results = json.loads((tmp_path / RESULTS_FILE).read_text())
    results["runs"][run_key(CELL, "linear", 8, 1e-3)]["train_seconds"] = 3600.0  # the last run took an hour
    mqar_sweep.save_results(tmp_path, results)
    _, logs = sweep(tmp_path, ["linear"], [16], {"linear": [1e-3]}, max_minutes=1.0)
    assert logs == ["p4/s24/linear/d16/lr0.001: not started, 60 s left of the budget (a run takes ~3600 s)"]


def test_bad_sweep_arguments(tmp_path):
    with pytest.raises(ValueError, match="mixers must be a non-empty subset"):
        sweep(tmp_path, ["mamba"], [8], {"mamba": [1e-3]})
    with pytest.raises(ValueError, match=r"at least one learning rate for \['linear'\]"):
        sweep(tmp_path, ["linear"], [8], {"linear": []})
    with pytest.raises(ValueError, match="widths must be positive integers"):
        sweep(tmp_path, ["linear"], [0], {"linear": [1e-3]})
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        sweep(tmp_path, ["linear"], [8], {"linear": [1e-3]}, workers=0)


def test_grid_cells_cheapest_first_and_those_too_short_left_out():
    fits, left_out = grid_cells([64, 256, 64], [1024, 512])
    assert [c.name for c in fits] == ["p64/s512", "p64/s1024", "p256/s1024"]  # tokens per step, then pairs
    assert [c.name for c in left_out] == ["p256/s512"]  # 4 * 256 > 512
    order = [s.key for s in plan_runs(fits[:2], ["deltanet", "linear"], [64], {"deltanet": [1e-3], "linear": [1e-3, 3e-3]})]
    assert order == ["p64/s512/deltanet/d64/lr0.001", "p64/s512/linear/d64/lr0.001", "p64/s512/linear/d64/lr0.003",
                     "p64/s1024/deltanet/d64/lr0.001", "p64/s1024/linear/d64/lr0.001", "p64/s1024/linear/d64/lr0.003"]


def test_grid_runs_are_keyed_by_cell_and_resume(tmp_path):
    cells = [Cell(24, 4), Cell(16, 2)]
    results, _ = sweep(tmp_path, ["linear-noconv"], [8], {"linear-noconv": [1e-3]}, cells=cells[:1])
    results, logs = sweep(tmp_path, ["linear-noconv"], [8], {"linear-noconv": [1e-3]}, cells=cells)
    assert logs[0] == f"p4/s24/linear-noconv/d8/lr0.001: complete in {tmp_path / RESULTS_FILE}, skipped"
    assert list(results["runs"]) == ["p4/s24/linear-noconv/d8/lr0.001", "p2/s16/linear-noconv/d8/lr0.001"]
    short = results["runs"]["p2/s16/linear-noconv/d8/lr0.001"]
    assert (short["num_pairs"], short["seq_len"], short["complete"]) == (2, 16, True)
    assert "num_pairs" not in results["settings"]["task"]  # shared settings hold no cell
    assert set(best_runs(results)) == {(Cell(24, 4), "linear-noconv", 8), (Cell(16, 2), "linear-noconv", 8)}
    with pytest.raises(ValueError, match="seq_len = 8 must be at least 4 \\* num_pairs = 16"):
        sweep(tmp_path, ["linear"], [8], {"linear": [1e-3]}, cells=[Cell(8, 4)])


def test_the_budget_guess_scales_with_the_sequence(tmp_path):
    sweep(tmp_path, ["linear"], [8], {"linear": [1e-3]})
    update_results(tmp_path, lambda r: r["runs"][run_key(CELL, "linear", 8, 1e-3)].update(train_seconds=40.0))
    _, logs = sweep(tmp_path, ["linear"], [8], {"linear": [1e-3]}, cells=[Cell(48, 4)], max_minutes=1.0)
    assert logs[-1] == "p4/s48/linear/d8/lr0.001: not started, 60 s left of the budget (a run takes ~80 s)"


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match="needs matplotlib"):
        check_plotting()


def test_plot_draws_every_run(tmp_path):
    import matplotlib  # noqa: F401  (a test extra: `pip install -e .[test]`)
    results, _ = sweep(tmp_path, ["linear", "attention"], [8], {"linear": [1e-3], "attention": [1e-3]})
    mqar_sweep.plot_curves(results, tmp_path / "mqar.png")
    assert (tmp_path / "mqar.png").stat().st_size > 0


def test_plot_lines_without_matplotlib(tmp_path, monkeypatch):
    """What plot_curves hands to matplotlib, checked with a stand-in module."""
    from unittest import mock

    results, _ = sweep(tmp_path, ["linear", "attention"], [8, 16], {"linear": [1e-3], "attention": [1e-3]})
    pyplot = mock.MagicMock()
    axes = [[mock.MagicMock(), mock.MagicMock()]]
    pyplot.subplots.return_value = (mock.MagicMock(), axes)
    matplotlib = mock.MagicMock(pyplot=pyplot)
    monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    mqar_sweep.plot_curves(results, tmp_path / "mqar.png")
    matplotlib.use.assert_called_once_with("Agg")
    for ax, width in zip(axes[0], [8, 16]):  # a panel a width, a line a run
        lines = {c.kwargs["label"]: (c.args[0], c.args[1]) for c in ax.plot.call_args_list}
        for mixer in ("linear", "attention"):
            run = results["runs"][run_key(CELL, mixer, width, 1e-3)]
            assert lines[f"{mixer} lr 0.001"] == ([p["step"] for p in run["curve"]], [p["accuracy"] for p in run["curve"]])
    pyplot.subplots.return_value[0].savefig.assert_called_once_with(tmp_path / "mqar.png", dpi=120)
