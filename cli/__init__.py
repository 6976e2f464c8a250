"""The `deltaflex` command line (typer). Installed as deltaflex.cli."""

from .app import app, main

__all__ = ["app", "main"]
