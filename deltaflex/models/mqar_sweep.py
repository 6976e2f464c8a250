"""MQAR over a grid: task cells (pairs x sequence length) x mixers x widths x learning rates, under a
wall-clock budget, results kept in one JSON, runs spread over worker processes.

`<out>/mqar.json` holds the settings every run shares (the vocabulary and the rest of the task, the
training settings but the learning rate, the model's depth and heads) and one entry a run, keyed
"p<pairs>/s<seq_len>/<mixer>/d<width>/lr<lr>". A run's entry is rewritten at every learning-curve
point, so a run cut short (the budget, a killed process) keeps what it had. A later call with the
same settings skips the complete runs and redoes the rest, so a grid can be spread over several
calls; a file holding other settings is refused rather than mixed.

Runs are tiny next to a GPU, so `workers` processes train at once on the same device, each taking
the next run not done; every write to the file is a read-modify-write under a file lock, so the
processes share the one JSON. Order: the cheaper cells first (shorter sequences, then fewer pairs),
and within a cell every width and mixer before the next cell. A run that would not fit in what is
left of the budget (judged by the last complete run of the same mixer, scaled to the run's sequence
length) is not started. `<out>/mqar.png` plots the learning curves, a panel a cell and width
(matplotlib, imported only to draw).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..plan import Plan
from .mqar import MQAR_MIXERS, MQARTask, MQARTraining, min_seq_len, train_mqar

RESULTS_FILE, PLOT_FILE, LOCK_FILE = "mqar.json", "mqar.png", ".mqar.lock"
CELL_FIELDS = ("num_pairs", "seq_len")  # the task fields a run's cell sets; the rest are shared


@dataclasses.dataclass(frozen=True, order=True)
class Cell:
    """One task setting of the grid; ordered by cost (tokens per step, then pairs)."""

    seq_len: int
    num_pairs: int

    @property
    def name(self) -> str:
        return f"p{self.num_pairs}/s{self.seq_len}"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    cell: Cell
    mixer: str
    width: int
    lr: float

    @property
    def key(self) -> str:
        return run_key(self.cell, self.mixer, self.width, self.lr)


def run_key(cell: Cell, mixer: str, width: int, lr: float) -> str:
    return f"{cell.name}/{mixer}/d{width}/lr{lr:g}"


def grid_cells(pairs: list[int], seq_lens: list[int]) -> tuple[list[Cell], list[Cell]]:
    """The cells whose pairs fit their sequence, cheapest first, and the combinations that do not."""
    every = sorted({Cell(s, p) for p in pairs for s in seq_lens})
    fits = [c for c in every if c.seq_len >= min_seq_len(c.num_pairs)]
    return fits, [c for c in every if c not in fits]


def cell_task(task: MQARTask, cell: Cell) -> MQARTask:
    return dataclasses.replace(task, num_pairs=cell.num_pairs, seq_len=cell.seq_len)


def settings(task: MQARTask, training: MQARTraining, num_layers: int, num_heads: int) -> dict:
    """What must match for runs to share one results file (the cell and the learning rate vary by run)."""
    shared_task = {k: v for k, v in dataclasses.asdict(task).items() if k not in CELL_FIELDS}
    train = {k: v for k, v in dataclasses.asdict(training).items() if k != "lr"}
    return {"task": shared_task, "training": train, "num_layers": num_layers, "num_heads": num_heads}


def plan_runs(cells: list[Cell], mixers: list[str], widths: list[int], lrs: dict[str, list[float]]) -> list[RunSpec]:
    """Every run of the grid, in the order they are handed out: cell by cell, then width, mixer, lr."""
    return [RunSpec(c, m, w, lr) for c in cells for w in widths for m in mixers for lr in lrs[m]]


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


def read_results(out: Path) -> dict:
    """The results file as it is now (always whole: every write replaces it in one rename)."""
    return json.loads((out / RESULTS_FILE).read_text())


def save_results(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (RESULTS_FILE + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / RESULTS_FILE)  # never a half-written file


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Holds the folder's lock: one process at a time reads and rewrites the results file."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def update_results(out: Path, change: Callable[[dict], None]) -> None:
    """Applies `change` to the results file in place, with no other process's write lost."""
    with _locked(out):
        results = read_results(out)
        change(results)
        save_results(out, results)


@dataclasses.dataclass(frozen=True)
class SweepJob:
    """What every run of a sweep shares; picklable, as worker processes receive it."""

    task: MQARTask  # vocabulary, gaps, fill; a run's cell sets num_pairs and seq_len
    training: MQARTraining  # a run's lr replaces training.lr
    out: Path
    device: str
    num_layers: int
    num_heads: int
    plan: str | Plan | None
    compile: bool
    deadline: float | None  # a time.time() value: one clock for every process, unlike time.monotonic()


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
    cells: list[Cell] | None = None,
    workers: int = 1,
) -> dict:
    """Trains every run of the grid not already complete in `out`; returns the results dict.

    cells: the grid's task cells (None: the one of `task`); their sequences must hold their pairs.
    lrs: learning rates for each mixer. on_run(key, steps) may return an on_step callback for the
    run (a progress bar; with one worker only, as the runs of other processes report just their end).
    """
    cells = [Cell(task.seq_len, task.num_pairs)] if cells is None else cells
    _check_grid(task, cells, mixers, widths, lrs, workers)
    _start_results(out, settings(task, training, num_layers, num_heads), fresh, env)
    done = read_results(out)["runs"]
    pending = []
    for spec in plan_runs(cells, mixers, widths, lrs):
        if done.get(spec.key, {}).get("complete"):
            log(f"{spec.key}: complete in {out / RESULTS_FILE}, skipped")
        else:
            pending.append(spec)
    deadline = None if max_minutes is None else time.time() + 60 * max_minutes
    job = SweepJob(task, training, out, str(device), num_layers, num_heads, plan, compile, deadline)
    if workers == 1 or len(pending) <= 1:
        for spec in pending:
            run_one(job, spec, log, on_run(spec.key, training.steps) if on_run else None)
    else:
        _run_in_workers(job, pending, workers, log)
    return read_results(out)


def _check_grid(task, cells, mixers, widths, lrs, workers) -> None:
    bad = [m for m in mixers if m not in MQAR_MIXERS]
    if bad or not mixers:
        raise ValueError(f"mixers must be a non-empty subset of {MQAR_MIXERS}, got {mixers}")
    missing = [m for m in mixers if not lrs.get(m)]
    if missing:
        raise ValueError(f"lrs must give at least one learning rate for {missing}")
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths must be positive integers, got {widths}")
    if not cells or not all(isinstance(c, Cell) for c in cells):
        raise ValueError(f"cells must be a non-empty list of Cell, got {cells}")
    for cell in cells:
        cell_task(task, cell)  # MQARTask says what does not fit (pairs against sequence and vocabulary)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")


def _start_results(out: Path, expected: dict, fresh: bool, env: dict | None) -> None:
    """Creates the results file (or checks that the one there holds the same settings)."""
    with _locked(out):
        results = {"settings": expected, "runs": {}} if fresh else load_results(out, expected)
        if env is not None:
            results["env"] = env
        save_results(out, results)


def run_one(job: SweepJob, spec: RunSpec, log: Callable[[str], None],
            progress: Callable[[int, dict | None], None] | None = None, announce: bool = False) -> None:
    """Trains one run (if it fits in the budget), its curve saved point by point, then its result.
    announce: log the start too (a worker's runs have no progress bar)."""
    left = None if job.deadline is None else job.deadline - time.time()
    guess = _expected_seconds(read_results(job.out), spec)
    if left is not None and (left <= 0 or (guess is not None and guess > left)):
        took = "" if guess is None else f" (a run takes ~{guess:.0f} s)"
        log(f"{spec.key}: not started, {max(left, 0):.0f} s left of the budget{took}")
        return
    if announce:
        log(f"{spec.key}: started (process {os.getpid()})")
    entry = {"mixer": spec.mixer, "width": spec.width, "lr": spec.lr, "num_pairs": spec.cell.num_pairs,
             "seq_len": spec.cell.seq_len, "complete": False, "steps_done": 0, "curve": []}
    _store_run(job.out, spec.key, entry)  # replaces an older partial run

    def on_step(step: int, point: dict | None) -> None:
        if progress is not None:
            progress(step, point)
        if point is not None:  # keep the curve so far, should the process die
            update_results(job.out, lambda r: _add_point(r["runs"][spec.key], step, point))

    deadline = None if left is None else time.monotonic() + left
    result = train_mqar(cell_task(job.task, spec.cell), spec.mixer, spec.width,
                        dataclasses.replace(job.training, lr=spec.lr), job.device, job.num_layers, job.num_heads,
                        job.plan, job.compile, deadline, on_step)
    _store_run(job.out, spec.key, result)
    state = "complete" if result["complete"] else f"cut at step {result['steps_done']} by the budget"
    log(f"{spec.key}: accuracy {result['accuracy']:.4f} ({state}, {result['train_seconds']:.0f} s)")


def _store_run(out: Path, key: str, run: dict) -> None:
    update_results(out, lambda results: results["runs"].update({key: run}))


def _add_point(run: dict, step: int, point: dict) -> None:
    run["steps_done"] = step
    run["curve"].append(point)


def _expected_seconds(results: dict, spec: RunSpec) -> float | None:
    """How long the last complete run of this mixer took, scaled by sequence length (tokens per
    step) to this run's; a lower bound for wider models."""
    done = [r for r in results["runs"].values() if r.get("complete") and r["mixer"] == spec.mixer]
    if not done:
        return None
    last = done[-1]
    return last["train_seconds"] * spec.cell.seq_len / last.get("seq_len", spec.cell.seq_len)


def _run_in_workers(job: SweepJob, pending: list[RunSpec], workers: int, log: Callable[[str], None]) -> None:
    """Trains `pending` in `workers` processes, each taking the next run off a shared queue; their
    log lines come back through a second queue."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    runs, logs = context.Queue(), context.Queue()
    workers = min(workers, len(pending))
    for spec in [*pending, *[None] * workers]:  # a None a worker: the end of the queue
        runs.put(spec)
    threads = max(1, (os.cpu_count() or 1) // workers)  # the host's cores split, not oversubscribed
    processes = [context.Process(target=_worker, args=(job, runs, logs, threads), daemon=True) for _ in range(workers)]
    for p in processes:
        p.start()
    while any(p.is_alive() for p in processes):
        _relay(logs, log, wait=0.2)
    for p in processes:
        p.join()
    _relay(logs, log, wait=0)
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} of {workers} MQAR workers failed (exit codes {failed}); "
                           "their runs stay incomplete in the results file, and the log above says why")


def _worker(job: SweepJob, runs, logs, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        while (spec := runs.get()) is not None:
            run_one(job, spec, logs.put, announce=True)
    except BaseException as e:
        logs.put(f"worker {os.getpid()} failed: {type(e).__name__}: {e}")
        raise


def _relay(logs, log: Callable[[str], None], wait: float) -> None:
    """Passes on the workers' log lines: those waiting, or the first to come within `wait` seconds."""
    try:
        line = logs.get(timeout=wait) if wait else logs.get_nowait()
        while True:
            log(line)
            line = logs.get_nowait()
    except queue.Empty:
        pass


def run_cell(run: dict) -> Cell:
    return Cell(run["seq_len"], run["num_pairs"])


def best_runs(results: dict) -> dict[tuple[Cell, str, int], dict]:
    """The complete run with the best accuracy for each (cell, mixer, width): Zoology's max over
    learning rates."""
    best = {}
    for run in results["runs"].values():
        if not run.get("complete"):
            continue
        key = (run_cell(run), run["mixer"], run["width"])
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
    """Test accuracy against training step: a panel a cell and width, a line a run."""
    fig = curves_figure(results)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves_figure(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"].values() if r.get("curve")]
    cells = sorted({run_cell(r) for r in runs}) or [Cell(0, 0)]
    widths = sorted({r["width"] for r in runs}) or [0]
    # constrained layout leaves room for the title, which wraps to the figure's width (one panel
    # is narrower than the title's line)
    fig, axes = plt.subplots(len(cells), len(widths), figsize=(4.5 * len(widths), 3.2 * len(cells) + 0.4),
                             squeeze=False, sharey=True, layout="constrained")
    colors = dict(zip(MQAR_MIXERS, ("tab:blue", "tab:orange", "tab:red", "tab:green")))
    for row, cell in enumerate(cells):
        for col, width in enumerate(widths):
            ax = axes[row][col]
            for r in (r for r in runs if r["width"] == width and run_cell(r) == cell):
                steps = [p["step"] for p in r["curve"]]
                accuracy = [p["accuracy"] for p in r["curve"]]
                style = "-" if r.get("complete") else ":"
                ax.plot(steps, accuracy, style, marker=".", markersize=3, color=colors.get(r["mixer"]),
                        label=f"{r['mixer']} lr {r['lr']:g}")  # markers: a curve of one point shows too
            ax.set_title(f"{cell.num_pairs} pairs, sequence {cell.seq_len}, width {width}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[row][0].set_ylabel("MQAR accuracy (test)")
    fig.suptitle(f"MQAR learning curves: vocabulary {results['settings']['task']['vocab_size']}, "
                 "test accuracy against training step", wrap=True)
    return fig
