"""`deltaflex mqar`: multi-query associative recall, DeltaNet vs linear vs softmax attention, over a
grid of task cells (--pairs x --seq-lens), widths and learning rates, in parallel worker processes."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .common import add_row, console, env, fail, parse_device, say

# Sizes left unset take the paper's hard setting (MQARTask's and MQARTraining's defaults), or with
# --quick a tiny CPU one
QUICK = {"widths": "32", "steps": 60, "batch_size": 16, "seq_len": 64, "num_pairs": 8, "vocab_size": 64,
         "eval_every": 20, "curve_examples": 32, "test_examples": 64}


def _full_sizes() -> dict:
    import dataclasses

    from deltaflex.models.mqar import MQARTask, MQARTraining

    return {"widths": "64,128,256", **dataclasses.asdict(MQARTask()), **dataclasses.asdict(MQARTraining())}


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"expected comma-separated positive integers, got {text!r}", param_hint=option)
    return values


def _mixers(text: str) -> list[str]:
    from deltaflex.models.mqar import MQAR_MIXERS

    mixers = [m.strip() for m in text.split(",") if m.strip()]
    if not mixers or any(m not in MQAR_MIXERS for m in mixers):
        raise typer.BadParameter(f"expected a comma-separated subset of {MQAR_MIXERS}, got {text!r}", param_hint="--mixers")
    return mixers


def _axis(grid: str | None, one: int | None, default: int, grid_option: str, one_option: str) -> tuple[list[int], str]:
    """The values of one grid axis (--pairs or --num-pairs, --seq-lens or --seq-len) and the option
    that gave them (for error messages)."""
    if grid is not None and one is not None:
        raise typer.BadParameter(f"give {grid_option} or {one_option}, not both", param_hint=grid_option)
    if grid is not None:
        return _ints(grid, grid_option), grid_option
    value = default if one is None else one
    if value < 1:
        raise typer.BadParameter(f"expected a positive integer, got {value}", param_hint=one_option)
    return [value], one_option


def _cells(pairs: list[int], seq_lens: list[int], vocab_size: int, pairs_option: str, seq_option: str):
    """The grid's cells; every pairs value must fit the vocabulary and at least one sequence length."""
    from deltaflex.models.mqar import min_seq_len, min_vocab_size
    from deltaflex.models.mqar_sweep import grid_cells

    for p in pairs:
        if vocab_size < min_vocab_size(p):
            raise typer.BadParameter(
                f"{p} pairs need a vocabulary of at least {min_vocab_size(p)} (keys come from its lower half), "
                f"got --vocab-size {vocab_size}", param_hint=pairs_option)
        if max(seq_lens) < min_seq_len(p):
            raise typer.BadParameter(
                f"{p} pairs need a sequence of at least 4 * {p} = {min_seq_len(p)} tokens (the pairs, then a query "
                f"slot of two tokens per key), more than the longest {seq_option} ({max(seq_lens)})",
                param_hint=pairs_option)
    return grid_cells(pairs, seq_lens)


def _lrs(texts: list[str] | None, mixers: list[str]) -> dict[str, list[float]]:
    """--lr 3e-3 (every mixer) or --lr deltanet=3e-3; repeated values for one mixer make a sweep."""
    from deltaflex.models.mqar import DEFAULT_LRS

    chosen: dict[str, list[float]] = {}
    for text in texts or []:
        name, _, value = text.rpartition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = -1.0
        if lr <= 0 or (name and name not in mixers):
            raise typer.BadParameter(f"expected LR or MIXER=LR with MIXER in {mixers}, got {text!r}", param_hint="--lr")
        for m in [name] if name else mixers:
            chosen.setdefault(m, []).append(lr)
    return {m: chosen.get(m) or [DEFAULT_LRS[m]] for m in mixers}


def _table(results: dict) -> Table:
    from deltaflex.models.mqar import MQAR_MIXERS
    from deltaflex.models.mqar_sweep import best_runs

    vocab = results["settings"]["task"]["vocab_size"]
    table = Table(title=f"MQAR accuracy (test), vocabulary {vocab}: the best lr of each mixer and width per cell")
    for col in ("pairs", "seq", "width", "mixer", "accuracy", "lr", "steps", "train s", "tokens/s"):
        table.add_column(col, justify="left" if col == "mixer" else "right")
    order = lambda kv: (kv[0][0], kv[0][2], MQAR_MIXERS.index(kv[0][1]))  # noqa: E731 - cell, width, mixer
    for (cell, mixer, width), r in sorted(best_runs(results).items(), key=order):
        add_row(table, cell.num_pairs, cell.seq_len, width, mixer, f"{r['accuracy']:.4f}", f"{r['lr']:g}",
                r["steps_done"], f"{r['train_seconds']:.0f}", f"{r['tokens_per_second']:.3g}")
    return table


def mqar(
    mixers: str = typer.Option("deltanet,linear,linear-noconv,attention",
                               help="comma-separated: deltanet, linear, linear-noconv (no short convolution), attention"),
    widths: str = typer.Option(None, help="comma-separated model widths [64,128,256]"),
    lr: list[str] = typer.Option(None, help="LR for every mixer or MIXER=LR; repeat for a sweep. Default: one known-good LR per mixer."),
    steps: int = typer.Option(None, help="training steps, the same for every run [5000]"),
    batch_size: int = typer.Option(None, help="sequences per step, fresh ones every step [128]"),
    seq_len: int = typer.Option(None, help="tokens per sequence, one cell [512]"),
    num_pairs: int = typer.Option(None, help="key-value pairs per sequence, one cell [64]"),
    pairs: str = typer.Option(None, help="comma-separated pairs per sequence: a grid with --seq-lens "
                              "(instead of --num-pairs)"),
    seq_lens: str = typer.Option(None, help="comma-separated sequence lengths: a grid with --pairs (instead of --seq-len); "
                                 "combinations too short for their pairs are left out"),
    vocab_size: int = typer.Option(None, help="vocabulary: keys from the lower half, values from the upper [8192]"),
    power_a: float = typer.Option(0.01, help="Zoology's power law of the query gaps"),
    random_fill: bool = typer.Option(False, help="random tokens between queries instead of 0 (Zoology's Figure 2: 0)"),
    layers: int = typer.Option(2, help="layers of the model"),
    heads: int = typer.Option(2, help="heads of every mixer"),
    eval_every: int = typer.Option(None, help="steps between learning-curve points [200]"),
    curve_examples: int = typer.Option(None, help="test sequences behind each learning-curve point [256]"),
    test_examples: int = typer.Option(None, help="test sequences behind the final accuracy [1000]"),
    seed: int = typer.Option(0, help="seed of the weights, the training data and (offset) the test set"),
    plan: str = typer.Option("auto", help='DeltaNet layers\' delta-rule plan ("auto": the fastest on the device, on CUDA '
                             'the fused Triton path, no compile; "eager", "compiled", ...)'),
    compile: bool = typer.Option(False, help="torch.compile the model (one graph per width and mixer)"),
    workers: int = typer.Option(1, help="runs trained at once, each in its own process on the same device"),
    device: str = typer.Option(None, help="cuda, cuda:N or cpu. Default: cuda when available."),
    max_minutes: float = typer.Option(None, help="wall-clock budget; runs that do not fit are left for a later call"),
    out: Path = typer.Option(Path("results/mqar"), help="folder of mqar.json (accumulated across calls) and mqar.png"),
    fresh: bool = typer.Option(False, help="start a new mqar.json instead of adding to the one in --out"),
    plot: bool = typer.Option(True, help="draw mqar.png (needs matplotlib)"),
    quick: bool = typer.Option(False, help="a tiny task and model (CPU smoke run) for the sizes not given"),
):
    """Train small models on multi-query associative recall (Zoology's MQAR) and compare mixers."""
    from deltaflex.models.mqar import MQARTask, MQARTraining
    from deltaflex.models.mqar_sweep import PLOT_FILE, RESULTS_FILE, check_plotting, plan_runs, plot_curves, run_sweep
    from deltaflex.plan import PLAN_NAMES

    sizes = QUICK if quick else _full_sizes()
    widths = sizes["widths"] if widths is None else widths
    steps, batch_size, vocab_size, eval_every, curve_examples, test_examples = (
        sizes[name] if value is None else value
        for name, value in (("steps", steps), ("batch_size", batch_size), ("vocab_size", vocab_size),
                            ("eval_every", eval_every), ("curve_examples", curve_examples),
                            ("test_examples", test_examples))
    )
    dev = parse_device(device)
    mixer_list, width_list = _mixers(mixers), _ints(widths, "--widths")
    lrs = _lrs(lr, mixer_list)
    pair_values, pairs_option = _axis(pairs, num_pairs, sizes["num_pairs"], "--pairs", "--num-pairs")
    seq_values, seq_option = _axis(seq_lens, seq_len, sizes["seq_len"], "--seq-lens", "--seq-len")
    cells, left_out = _cells(pair_values, seq_values, vocab_size, pairs_option, seq_option)
    if plan not in PLAN_NAMES:
        raise typer.BadParameter(f"expected one of {PLAN_NAMES}, got {plan!r}", param_hint="--plan")
    if max_minutes is not None and max_minutes <= 0:
        raise typer.BadParameter(f"expected a positive number of minutes, got {max_minutes}", param_hint="--max-minutes")
    if workers < 1:
        raise typer.BadParameter(f"expected a positive number of worker processes, got {workers}", param_hint="--workers")
    try:
        task = MQARTask(vocab_size, cells[0].seq_len, cells[0].num_pairs, power_a, random_fill)
        training = MQARTraining(steps=steps, batch_size=batch_size, eval_every=eval_every,
                                curve_examples=curve_examples, test_examples=test_examples, seed=seed)
        for w in width_list:
            if w % heads:
                raise ValueError(f"--heads {heads} must divide every width, got {w}")
        if plot:
            check_plotting()
    except (ValueError, ImportError) as e:
        fail(str(e))
    if left_out:
        say(f"left out of the grid, sequences too short for their pairs: {', '.join(c.name for c in left_out)}")
    say(f"MQAR on {dev}: cells {', '.join(c.name for c in cells)} (pairs/sequence), vocabulary {vocab_size}, "
        f"{steps} steps of {batch_size}, mixers {mixer_list}, widths {width_list}, lrs {lrs}, plan {plan}, "
        f"compile {compile}, {workers} worker(s)")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:

        def on_run(key: str, total: int):
            bar = progress.add_task(key, total=total, info="")

            def on_step(step: int, point: dict | None):
                info = None if point is None else f"loss {point['loss']:.3f} acc {point['accuracy']:.3f}"
                progress.update(bar, completed=step, **({} if info is None else {"info": info}))

            return on_step

        try:
            results = run_sweep(task, training, mixer_list, width_list, lrs, out, device=dev, num_layers=layers,
                                num_heads=heads, plan=plan, compile=compile, max_minutes=max_minutes, fresh=fresh,
                                on_run=on_run, log=lambda s: progress.console.print(s, markup=False, highlight=False),
                                env=env(dev), cells=cells, workers=workers)
        except (ValueError, RuntimeError) as e:
            fail(str(e))
    if plot:
        plot_curves(results, out / PLOT_FILE)
    say(f"results: {out / RESULTS_FILE}" + (f", learning curves: {out / PLOT_FILE}" if plot else ""))
    console.print(_table(results))
    wanted = [spec.key for spec in plan_runs(cells, mixer_list, width_list, lrs)]
    for key in wanted:
        change = results["runs"].get(key, {}).get("still_moving")
        if change is not None:
            say(f"warning: {key}: its test accuracy still moved by {change:+.3f} over the last fifth of its "
                f"{steps} steps; train longer (--steps) before reading it as the mixer's result")
    left = [k for k in wanted if not results["runs"].get(k, {}).get("complete")]
    if left:
        say(f"not complete yet: {', '.join(left)}; the same command again does them")
