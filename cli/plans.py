"""`deltaflex plans list|show|clear|export|import`: the named plans and the plan cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import typer
from rich.table import Table

from .common import add_row, console, say, fail, fmt

app = typer.Typer(help="The named plans and the tuned plans in the plan cache.", no_args_is_help=True)


def environments_here() -> set:
    """The environments (device + versions) plans would be looked up under on this machine."""
    from deltaflex.tuning.key import environment

    here = {environment("cpu")}
    if torch.cuda.is_available():
        here |= {environment("cuda", i) for i in range(torch.cuda.device_count())}
    return here


def availability(plan, device_type: str) -> str:
    from deltaflex.plan import STAGES, check_available, kernel_space

    missing = [s for s in STAGES if getattr(plan, s) == "triton" and kernel_space(s) is None]
    if missing:
        return f"no: no triton kernel yet for {', '.join(missing)}"
    try:
        check_available(plan, device_type)
    except (NotImplementedError, ValueError) as e:
        return f"no: {e}"
    return "yes"


def named_table() -> Table:
    from deltaflex.plan import NAMED_PLANS

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    table = Table(title='named plans (and "auto": the tuned plan for the device, dtype and shape, else the default)')
    for col in ("name", "plan", f"available on {device_type}"):
        table.add_column(col)
    for name, plan in NAMED_PLANS.items():
        add_row(table, name, plan.describe(), availability(plan, device_type))
    return table


def cache_table(entries) -> Table:
    here = environments_here()
    table = Table(title="tuned plans in the cache (speedup = default time / tuned time)")
    for col in ("#", "device", "dtype", "K", "V", "T <=", "B*H <=", "plan", "ms", "speedup", "mode", "tuned at", "used here"):
        table.add_column(col, justify="right" if col in ("#", "K", "V", "T <=", "B*H <=", "ms", "speedup") else "left")
    for i, e in enumerate(entries):
        k = e.key
        add_row(
            table,
            str(i), k.env.device, k.dtype, str(k.K), str(k.V), str(k.T_bucket), str(k.BH_bucket), e.plan.describe(),
            fmt(e.time_ms, ".3f"), fmt(e.default_ms / e.time_ms if e.time_ms else None, ".2f"), e.mode, e.tuned_at,
            "yes" if k.env in here else "no (other device or versions)",
        )
    return table


@app.command("list")
def list_plans():
    """The named plans, and every tuned plan in the cache."""
    from deltaflex.tuning.cache import PlanCache

    cache = PlanCache()
    console.print(named_table())
    entries = cache.entries()
    if entries:
        console.print(cache_table(entries))
    else:
        console.print("no tuned plans yet (run `deltaflex tune --gpu` or `--cpu`)")
    say(f"plan cache: {cache.path}")


@app.command()
def show(which: str = typer.Argument(..., help="A plan name, or a tuned plan's # from `deltaflex plans list`.")):
    """Print a named or tuned plan as JSON."""
    from deltaflex.plan import NAMED_PLANS
    from deltaflex.tuning.cache import PlanCache

    if which in NAMED_PLANS:
        console.print_json(NAMED_PLANS[which].to_json())
        return
    entries = PlanCache().entries()
    if which.isdigit() and int(which) < len(entries):
        console.print_json(json.dumps(entries[int(which)].to_dict()))
        return
    fail(f"no plan {which!r}: expected one of {list(NAMED_PLANS)} or a number below {len(entries)} "
         f"(the # column of `deltaflex plans list`)")


@app.command()
def clear(
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    studies: bool = typer.Option(False, help="Also delete the tuner's stored studies (resumable runs)."),
):
    """Delete every tuned plan from the cache."""
    from deltaflex.tuning.cache import PlanCache

    cache = PlanCache()
    if not yes:
        typer.confirm(f"delete every tuned plan in {cache.path}?", abort=True)
    removed = cache.clear() if cache.path.exists() else 0
    if studies:
        shutil.rmtree(cache.directory / "studies", ignore_errors=True)
    say(f"removed {removed} tuned plan(s)" + (" and the stored studies" if studies else ""))


@app.command("export")
def export_plans(
    file: Path = typer.Argument(..., help="JSON file to write."),
    force: bool = typer.Option(False, help="Overwrite FILE if it exists."),
):
    """Write every tuned plan to FILE (the cache's own format), e.g. to import on another machine."""
    from deltaflex.tuning.cache import PlanCache, dumps

    if file.exists() and not force:
        fail(f"{file} exists; pass --force to overwrite it")
    entries = PlanCache().entries()
    try:
        file.write_text(dumps(entries))
    except OSError as e:
        fail(f"cannot write {file}: {e}")
    say(f"exported {len(entries)} tuned plan(s) to {file}")


@app.command("import")
def import_plans(file: Path = typer.Argument(..., help="JSON file written by `deltaflex plans export`.")):
    """Add the tuned plans in FILE to the cache (replacing entries with the same key)."""
    from deltaflex.tuning.cache import PlanCache, parse

    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read {file}: {e}")
    entries, problems = parse(text, str(file))
    if problems:
        fail("; ".join(problems) + "; nothing imported")
    cache = PlanCache()
    cache.save(*entries)
    here = environments_here()
    foreign = sum(e.key.env not in here for e in entries)
    note = f" ({foreign} for other devices or versions: kept, not used here)" if foreign else ""
    say(f"imported {len(entries)} tuned plan(s) into {cache.path}{note}")
