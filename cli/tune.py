"""`deltaflex tune`: find and cache the fastest correct plan per shape on this machine."""

from __future__ import annotations

import enum

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .common import PAPER_SHAPES, add_row, console, say, device_name, fail, fmt, parse_device, parse_dtype, parse_shapes


class Mode(str, enum.Enum):
    fwd = "fwd"
    fwdbwd = "fwdbwd"


def _target_device(gpu: bool, cpu: bool, device: str | None) -> torch.device:
    chosen = [name for name, on in (("--gpu", gpu), ("--cpu", cpu), ("--device", device is not None)) if on]
    if len(chosen) != 1:
        raise typer.BadParameter("choose what to tune: one of --gpu, --cpu or --device cuda:N", param_hint="--gpu/--cpu/--device")
    if cpu:
        return torch.device("cpu")
    if gpu and not torch.cuda.is_available():
        fail("no CUDA device is available: `deltaflex tune --gpu` needs one (tune the CPU path with --cpu)")
    return parse_device("cuda" if gpu else device)


def _fitting_paper_shapes(dev: torch.device, dtype: torch.dtype):
    """The paper's kernel-benchmark shapes whose working set (a generous 32x the inputs in float32) fits
    in the device's free memory."""
    from deltaflex.bench import paper_shapes

    free, _ = torch.cuda.mem_get_info(dev)
    return [s for s in paper_shapes() if 32 * s.B * s.T * s.H * (2 * s.K + s.V + 1) * 4 < free]


def _result_table(results) -> Table:
    table = Table(title="tuned plans (median ms; speedup = default time / tuned time)")
    columns = ("shape", "dtype", "mode", "default plan", "default ms", "tuned plan", "tuned ms", "speedup", "max err",
               "trials ok/wrong/failed")
    for col in columns:
        table.add_column(col, justify="right" if ("ms" in col or col in ("speedup", "max err")) else "left")
    for r in results:
        e = r.entry
        counts = "/".join(str(r.statuses.get(s, 0)) for s in ("ok", "rejected", "failed"))
        add_row(
            table,
            e.shape, e.key.dtype, e.mode, r.default.describe(), fmt(r.default_ms, ".3f"), e.plan.describe(),
            fmt(e.time_ms, ".3f"), fmt(r.default_ms / e.time_ms, ".2f"), fmt(e.error, ".1e"), counts,
        )
    return table


def tune(
    gpu: bool = typer.Option(False, "--gpu", help="Tune the current CUDA device."),
    cpu: bool = typer.Option(False, "--cpu", help="Tune the CPU path."),
    device: str = typer.Option(None, help="Tune this device: cuda:N (or cpu)."),
    shape: list[str] = typer.Option(None, help=(
        f"B,T,H,K[,V]; repeatable. Default: those of {PAPER_SHAPES} that fit the GPU; 1,512,4,64 on CPU.")),
    dtype: str = typer.Option(None, help="bf16, fp16, fp32 or fp64. Default: bf16 on CUDA, fp32 on CPU."),
    trials: int = typer.Option(20, min=1, help="New trials per shape (the default plan's baseline is one of them)."),
    timeout: float = typer.Option(540.0, min=0, help=(
        "Seconds per shape, baseline included: no trial starts that would end later, judging by the slowest "
        "trial so far; 0: no limit.")),
    mode: Mode = typer.Option(Mode.fwdbwd, help="Time the forward only, or forward+backward."),
    seed: int = typer.Option(0, help="Seed of the TPE sampler."),
    compile: bool = typer.Option(None, "--compile/--no-compile", help=(
        "Search compiled plans too / eager plans only. Default: compiled and eager on CUDA, eager only on CPU "
        "(a compile costs tens of seconds a graph there).")),
    max_autotune: bool = typer.Option(False, help="Also search torch.compile's max-autotune mode (compiles take minutes)."),
):
    """Find the fastest correct plan per shape and cache it for plan="auto".

    An optuna study per shape: every plan is checked against the float64 oracle, the correct ones
    are timed, and the best is compared with the default plan before it is saved.
    """
    from deltaflex.bench import Shape
    from deltaflex.tuning.cache import PlanCache
    from deltaflex.tuning.tuner import DeviceFault, TuningFailed
    from deltaflex.tuning.tuner import tune as tune_shape

    dev = _target_device(gpu, cpu, device)
    dt = parse_dtype(dtype or ("bf16" if dev.type == "cuda" else "fp32"))
    shapes = parse_shapes(shape, lambda: _fitting_paper_shapes(dev, dt) if dev.type == "cuda" else [Shape(1, 512, 4, 64, 64)])
    if not shapes:
        fail(f"none of the benchmark shapes fits in {device_name(dev)}'s free memory; give --shape")
    try:
        import optuna  # noqa: F401
    except ImportError:
        fail("deltaflex tune needs optuna: pip install optuna")
    cache = PlanCache()
    say(f"tuning {dev} ({device_name(dev)}), {dt}, mode {mode.value}, {len(shapes)} shape(s), "
        f"{trials} trials / {timeout:g} s each; cache {cache.path}")
    results, failed = [], []
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[best]}"), console=console) as progress:
        for s in shapes:
            task = progress.add_task(str(s), total=trials, best="")

            def on_trial(report, task=task):
                best = f"best {report.best_ms:.3f} ms" if report.best_ms is not None else ""
                progress.update(task, advance=1, best=best)
                if report.outcome.status != "ok":
                    progress.console.print(f"  trial {report.number} {report.plan.describe()}: {report.outcome.status}: "
                                           f"{report.outcome.detail}", style="dim", markup=False, highlight=False)

            try:
                results.append(tune_shape(s, device=dev, dtype=dt, mode=mode.value, trials=trials, timeout=timeout or None,
                                          seed=seed, compile=compile, max_autotune=max_autotune, cache=cache,
                                          on_trial=on_trial))
            except DeviceFault as e:  # the GPU is unusable in this process: no further shape can run
                failed.append(f"{s}: {e}")
                break
            except TuningFailed as e:
                failed.append(f"{s}: {e}")
    if results:
        console.print(_result_table(results))
        say(f"saved to {cache.path}")
    if failed:
        fail("tuning failed for " + "; ".join(failed))
