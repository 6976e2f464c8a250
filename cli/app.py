"""The `deltaflex` command: one module a command, gathered here."""

from __future__ import annotations

import typer

from . import plans
from .bench import bench
from .compare import compare
from .info import info
from .mqar import mqar
from .train import train
from .tune import tune

app = typer.Typer(help="deltaflex: the DeltaNet delta rule as compiled blocked PyTorch ops.", no_args_is_help=True)
app.command()(bench)
app.command()(tune)
app.command()(compare)
app.command()(info)
app.command()(mqar)
app.command()(train)
app.add_typer(plans.app, name="plans")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
