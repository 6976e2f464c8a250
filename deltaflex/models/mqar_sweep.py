"""MQAR over mixers x widths x learning rates under a wall-clock budget, results kept in one JSON.

`<out>/mqar.json` holds the task, the training settings and one entry a run, keyed
"<mixer>/d<width>/lr<lr>"; it is rewritten at every learning-curve point, so a run cut short (the
budget, a killed process) keeps what it had. A later call with the same settings skips the complete
runs and redoes the rest, so a sweep can be spread over several calls; a file holding other settings
is refused rather than mixed. `<out>/mqar.png` plots the learning curves (matplotlib, imported only
to draw). A run that would not fit in what is left of the budget (judged by the last complete run of
the same mixer) is not started.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from ..plan import Plan
from .mqar import MQAR_MIXERS, MQARTask, MQARTraining, train_mqar

RESULTS_FILE, PLOT_FILE = "mqar.json", "mqar.png"


def run_key(mixer: str, width: int, lr: float) -> str:
    return f"{mixer}/d{width}/lr{lr:g}"


def settings(task: MQARTask, training: MQARTraining, num_layers: int, num_heads: int) -> dict:
    """What must match for runs to share one results file (the learning rate varies by run)."""
    train = {k: v for k, v in dataclasses.asdict(training).items() if k != "lr"}
    return {"task": dataclasses.asdict(task), "training": train, "num_layers": num_layers, "num_heads": num_heads}


def load_results(out: Path, expected: dict) -> dict:
    """The results file in `out`, or a fresh one; ValueError if it holds other settings."""
    path = out / RESULTS_FILE
    if not path.exists():
        return {"settings": expected, "runs": {}}
    results = json.loads(path.read_text())
    if results.get("settings") != expected:
        raise ValueError(
            f"{path} holds results for other settings ({results.get('settings')}); "
            "use another --out, or --fresh to start over"
        )
    return results


def save_results(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (RESULTS_FILE + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / RESULTS_FILE)  # never a half-written file


def run_sweep(
    task: MQARTask,
    training: MQARTraining,
    mixers: list[str],
    widths: list[int],
    lrs: dict[str, list[float]],
    out: Path,
    device="cpu",
    num_layers: int = 2,
    num_heads: int = 2,
    plan: str | Plan | None = None,
    compile: bool = False,
    max_minutes: float | None = None,
    fresh: bool = False,
    on_run: Callable[[str, int], Callable[[int, dict | None], None] | None] | None = None,
    log: Callable[[str], None] = print,
    env: dict | None = None,
) -> dict:
    """Trains every (mixer, width, lr) not already complete in `out`; returns the results dict.

    lrs: learning rates for each mixer. on_run(key, steps) may return an on_step callback for the
    run (a progress bar). Width-major order: every mixer at the first width, then the next width.
    """
    bad = [m for m in mixers if m not in MQAR_MIXERS]
    if bad or not mixers:
        raise ValueError(f"mixers must be a non-empty subset of {MQAR_MIXERS}, got {mixers}")
    missing = [m for m in mixers if not lrs.get(m)]
    if missing:
        raise ValueError(f"lrs must give at least one learning rate for {missing}")
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths must be positive integers, got {widths}")
    expected = settings(task, training, num_layers, num_heads)
    results = {"settings": expected, "runs": {}} if fresh else load_results(out, expected)
    if env is not None:
        results["env"] = env
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    for width in widths:
        for mixer in mixers:
            for lr in lrs[mixer]:
                key = run_key(mixer, width, lr)
                if results["runs"].get(key, {}).get("complete"):
                    log(f"{key}: complete in {out / RESULTS_FILE}, skipped")
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                guess = _expected_seconds(results, mixer)
                if left is not None and (left <= 0 or (guess is not None and guess > left)):
                    log(f"{key}: not started, {max(left, 0):.0f} s left of the budget (a run takes ~{guess or 0:.0f} s)")
                    continue
                run_training = dataclasses.replace(training, lr=lr)
                progress = on_run(key, training.steps) if on_run else None

                def on_step(step, point, key=key, progress=progress, mixer=mixer, width=width, lr=lr):
                    if progress is not None:
                        progress(step, point)
                    if point is not None:  # keep the curve so far, should the process die
                        partial = {"mixer": mixer, "width": width, "lr": lr, "complete": False, "steps_done": step}
                        results["runs"][key] = {**results["runs"].get(key, {}), **partial}
                        results["runs"][key].setdefault("curve", []).append(point)
                        save_results(out, results)

                results["runs"].pop(key, None)
                result = train_mqar(
                    task, mixer, width, run_training, device, num_layers, num_heads, plan, compile, deadline, on_step
                )
                results["runs"][key] = result
                save_results(out, results)
                state = "complete" if result["complete"] else f"cut at step {result['steps_done']} by the budget"
                log(f"{key}: accuracy {result['accuracy']:.4f} ({state}, {result['train_seconds']:.0f} s)")
    return results


def _expected_seconds(results: dict, mixer: str) -> float | None:
    """How long the last complete run of this mixer took (a lower bound for wider models)."""
    done = [r for r in results["runs"].values() if r.get("complete") and r["mixer"] == mixer]
    return done[-1]["train_seconds"] if done else None


def best_runs(results: dict) -> dict[tuple[str, int], dict]:
    """The complete run with the best accuracy for each (mixer, width): Zoology's max over learning rates."""
    best = {}
    for run in results["runs"].values():
        if not run.get("complete"):
            continue
        key = (run["mixer"], run["width"])
        if key not in best or run["accuracy"] > best[key]["accuracy"]:
            best[key] = run
    return best


def check_plotting() -> None:
    """Raises a clear error when matplotlib is missing (before any training, not after)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError("the MQAR learning-curve plot needs matplotlib (pip install matplotlib), or pass --no-plot") from e


def plot_curves(results: dict, path: Path) -> None:
    """Test accuracy against training step: one panel a width, one line a run."""
    fig = curves_figure(results)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves_figure(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"].values() if r.get("curve")]
    widths = sorted({r["width"] for r in runs}) or [0]
    # constrained layout leaves room for the title, which wraps to the figure's width (one panel
    # is narrower than the title's line)
    fig, axes = plt.subplots(1, len(widths), figsize=(4.5 * len(widths), 3.6), squeeze=False, sharey=True,
                             layout="constrained")
    colors = dict(zip(MQAR_MIXERS, ("tab:blue", "tab:orange", "tab:green")))
    for ax, width in zip(axes[0], widths):
        for r in (r for r in runs if r["width"] == width):
            steps = [p["step"] for p in r["curve"]]
            accuracy = [p["accuracy"] for p in r["curve"]]
            style = "-" if r.get("complete") else ":"
            ax.plot(steps, accuracy, style, color=colors.get(r["mixer"]), label=f"{r['mixer']} lr {r['lr']:g}")
        ax.set_title(f"width {width}")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    task = results["settings"]["task"]
    axes[0][0].set_ylabel("MQAR accuracy (test)")
    fig.suptitle(f"MQAR: sequence {task['seq_len']}, {task['num_pairs']} key-value pairs, vocabulary {task['vocab_size']}",
                 wrap=True)
    return fig
