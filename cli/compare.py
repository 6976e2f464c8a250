"""`deltaflex compare`: compiled vs hand-written vs mixed plans (and fla) side by side."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer
from rich.table import Table

from .common import PAPER_SHAPES, add_row, console, say, env, fail, fmt, parse_device, parse_dtype, parse_shapes

BASELINE_NOTE = "speedup = the first plan's time / this time"


def _default_plan_names(device_type: str) -> list[str]:
    from deltaflex.plan import NAMED_PLANS, check_available

    if device_type != "cuda":
        return ["eager", "compiled"]
    names = []
    for name in ("compiled", "fused", "triton", *(n for n in NAMED_PLANS if n.startswith("mixed-"))):
        try:
            check_available(NAMED_PLANS[name], device_type)
        except (NotImplementedError, ValueError):
            continue
        names.append(name)
    return names


def _checked_plan_names(names: list[str], device_type: str) -> list[str]:
    from deltaflex.plan import PLAN_NAMES, resolve_plan

    for name in names:
        if name not in PLAN_NAMES:
            raise typer.BadParameter(f"expected one of {PLAN_NAMES}, got {name!r}", param_hint="--plan")
        try:
            resolve_plan(name, None, device_type)
        except (NotImplementedError, ValueError) as e:
            raise typer.BadParameter(f"plan {name!r} cannot run here: {e}", param_hint="--plan") from e
    return names


def _contenders(names: list[str], shape, dev: torch.device, dtype: torch.dtype, fla: bool, with_auto: bool,
                transformers: bool = True):
    """(contender, plan description) pairs; "auto" joins the defaults when it differs from them."""
    from deltaflex.bench import deltaflex_contender, fla_contenders
    from deltaflex.plan import resolve_plan
    from deltaflex.tuning.auto import auto_plan

    auto = auto_plan(dev, dtype, shape.B, shape.T, shape.H, shape.K, shape.V)
    plans = {name: (auto if name == "auto" else resolve_plan(name, None, dev.type)) for name in names}
    if with_auto and auto not in plans.values():
        plans["auto"] = auto
    out = [(deltaflex_contender(plan, name=f"deltaflex[{name}]"), plan.describe()) for name, plan in plans.items()]
    if fla and dev.type == "cuda":
        out += [(c, "") for c in fla_contenders()]
    if transformers:
        from deltaflex.bench import transformers_contenders

        out += [(c, c.note) for c in transformers_contenders()]
    return out


def _add_speedups(rows: list[dict]) -> None:
    base = {}
    for r in rows:
        if "fwd_ms" in r and r["contender"].startswith("deltaflex"):
            base.setdefault(r["shape"], r)
    for r in rows:
        b = base.get(r["shape"])
        if b and "fwd_ms" in r:
            r["speedup_fwd"] = b["fwd_ms"] / r["fwd_ms"]
            r["speedup_fwd_bwd"] = b["fwd_bwd_ms"] / r["fwd_bwd_ms"]


def _table(rows: list[dict]) -> Table:
    table = Table(title=f"plans compared (median ms; {BASELINE_NOTE}; vs fla = fla chunk's time / this time)")
    cols = ("shape", "contender", "plan", "rel err", "fwd ms", "fwd+bwd ms", "speedup fwd", "speedup fwd+bwd",
            "vs fla fwd+bwd", "first call s")
    for col in cols:
        table.add_column(col, justify="left" if col in ("shape", "contender", "plan") else "right")
    for r in rows:
        if "error" in r:
            add_row(table, r["shape"], r["contender"], r.get("plan", ""), r["error"], *["-"] * 6)
            continue
        add_row(
            table,
            r["shape"], r["contender"], r.get("plan", ""), fmt(r.get("rel_err"), ".1e"), fmt(r["fwd_ms"], ".3f"),
            fmt(r["fwd_bwd_ms"], ".3f"), fmt(r.get("speedup_fwd"), ".2f"), fmt(r.get("speedup_fwd_bwd"), ".2f"),
            fmt(r.get("fla_fwd_bwd_ratio"), ".2f"), fmt(r.get("first_call_s"), ".1f"),
        )
    return table


def _import_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("--plot needs matplotlib, which is not installed: pip install matplotlib")
    return plt


def plot_rows(rows: list[dict], path: Path) -> None:
    """Grouped bars: one group a shape, one bar a contender; forward and forward+backward panels."""
    plt = _import_pyplot()
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    names = list(dict.fromkeys(r["contender"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(shapes) * 2), 4.5))
    width = 0.8 / len(names)
    for ax, field, title in zip(axes, ("fwd_ms", "fwd_bwd_ms"), ("forward", "forward + backward")):
        for i, name in enumerate(names):
            by_shape = {r["shape"]: r.get(field) for r in rows if r["contender"] == name}
            xs = [j + i * width for j, s in enumerate(shapes) if by_shape.get(s) is not None]
            ax.bar(xs, [by_shape[s] for s in shapes if by_shape.get(s) is not None], width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=30, ha="right")
        ax.set_ylabel("median ms")
        ax.set_title(title)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(
    shape: list[str] = typer.Option(None, help=(
        f"B,T,H,K[,V]; repeatable. Default on CUDA: {PAPER_SHAPES}; 1,512,4,64 on CPU.")),
    plan: list[str] = typer.Option(None, help=(
        "Plan names (eager, compiled, fused, triton, mixed-<stage>, auto); repeatable; the first is the baseline. "
        "Default: compiled and every available hand-written and mixed plan (eager and compiled on CPU), "
        "and auto where it has a tuned plan.")),
    device: str = typer.Option(None, help="cuda, cuda:N or cpu. Default: cuda when available."),
    dtype: str = typer.Option(None, help="bf16, fp16, fp32 or fp64. Default: bf16 on CUDA, fp32 on CPU."),
    fla: bool = typer.Option(True, help="Include fla-core's kernels when importable (CUDA)."),
    transformers: bool = typer.Option(True, help="Include transformers' torch fallback (eager and compiled) when importable."),
    threads: int = typer.Option(None, min=1, help="torch.set_num_threads for the run (CPU)."),
    plot: Path = typer.Option(None, help="Draw the times into this image (needs matplotlib)."),
    out: Path = typer.Option(None, help="Write compare.json into this directory."),
):
    """Time plans side by side at given shapes, with each one's error against the float64 oracle."""
    from deltaflex.bench import Shape, add_fla_ratios, finished, measure, paper_shapes, starting
    from deltaflex.reference import recurrent_delta_rule_ref
    from deltaflex.testing import TOLERANCES, make_inputs

    dev = parse_device(device)
    dt = parse_dtype(dtype or ("bf16" if dev.type == "cuda" else "fp32"))
    shapes = parse_shapes(shape, lambda: paper_shapes() if dev.type == "cuda" else [Shape(1, 512, 4, 64, 64)])
    names = _checked_plan_names(plan, dev.type) if plan else _default_plan_names(dev.type)
    if plot:
        _import_pyplot()  # fail before measuring, not after
    if threads is not None:
        torch.set_num_threads(threads)
    say(f"comparing on {dev}, {dt}: {names}")
    rows = []
    for s in shapes:
        x = make_inputs(s.B, s.T, s.H, s.K, s.V, dtype=dt, device=dev)
        o_ref = recurrent_delta_rule_ref(**x)[0]
        for contender, description in _contenders(names, s, dev, dt, fla, with_auto=not plan, transformers=transformers):
            say(starting(s, contender))
            try:
                row = measure(contender, x, o_ref, dev)
            except torch.OutOfMemoryError:
                row = {"contender": contender.name, "error": "out of memory"}
                torch.cuda.empty_cache()
            except Exception as e:  # one contender failing must not hide the others' figures
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                row = {"contender": contender.name, "error": f"{type(e).__name__}: {first_line}"[:120]}
            row.update(shape=str(s), plan=description, dtype=str(dt).removeprefix("torch."))
            rows.append(row)
            say(finished(row))
    add_fla_ratios(rows)
    _add_speedups(rows)
    console.print(_table(rows))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps({"env": env(dev), "rows": rows}, indent=1))
    if plot:
        plot_rows(rows, plot)
        say(f"plot written to {plot}")
    bad = [r for r in rows if r["contender"].startswith("deltaflex") and ("error" in r or not r["rel_err"] <= TOLERANCES[dt])]
    if bad:
        fail(f"{len(bad)} deltaflex plan(s) failed or exceeded the {dt} tolerance {TOLERANCES[dt]:g}")
