"""What every command shares: the console, argument parsers, environment facts."""

from __future__ import annotations

import contextlib
import platform
import sys
import warnings

import torch
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console(width=None if sys.stdout.isatty() else 160)

# The shapes of the paper's kernel benchmark (deltaflex.bench.paper_shapes), as --help names them
PAPER_SHAPES = ("the paper's kernel benchmark: d_model 2048, 16K tokens a batch (B,T = 8,2048 4,4096 2,8192), "
                "head dims 64, 128, 256 (H = 2048 / head dim)")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def parse_device(device: str | None) -> torch.device:
    """cuda, cuda:N or cpu; None: cuda when available."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise typer.BadParameter(f"expected cuda, cuda:N or cpu, got {device!r}", param_hint="--device") from e
    if dev.type not in ("cuda", "cpu"):
        raise typer.BadParameter(f"expected cuda, cuda:N or cpu, got {device!r}", param_hint="--device")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter(f"{device} requested but no CUDA device is available", param_hint="--device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise typer.BadParameter(f"{device}: there are {torch.cuda.device_count()} CUDA devices", param_hint="--device")
    return dev


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise typer.BadParameter(f"expected one of {sorted(DTYPES)}, got {name!r}", param_hint="--dtype")
    return DTYPES[name]


def parse_shapes(texts: list[str] | None, default):
    from deltaflex.bench import Shape

    try:
        return [Shape.parse(s) for s in texts] if texts else default()
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--shape") from e


def say(text: str) -> None:
    """Prints text as it is: no markup, no highlighting (paths, plan lists, shapes)."""
    console.print(text, markup=False, highlight=False)


def add_row(table: Table, *cells: str) -> None:
    """A table row of plain text: contender names and plans like 'deltaflex[eager]' or
    'triton state[BK=64 w4 s2]' are not rich markup."""
    table.add_row(*(Text(str(c)) for c in cells))


@contextlib.contextmanager
def library_warnings():
    """Collects the warnings torch, Inductor and Triton raise during a measurement, which would break
    up the progress lines; yields the list that `distinct_warnings` reads afterwards."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        yield caught


def distinct_warnings(caught) -> list[str]:
    """One line a distinct warning: its category and the first line of its message."""
    return list(dict.fromkeys(f"{w.category.__name__}: {(str(w.message).strip().splitlines() or [''])[0]}"
                              for w in caught))


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"


def env(dev: torch.device) -> dict:
    env = {"device": device_name(dev), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import fla

        env["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        pass
    return env


def fail(message: str, code: int = 1):
    """Prints the message in red and exits with `code`."""
    console.print(Text(message, style="red"))
    raise typer.Exit(code)
