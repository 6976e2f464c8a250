"""`deltaflex info`: device, versions, the plan cache and which plans exist."""

from __future__ import annotations

from rich.table import Table

from .common import add_row, console, env, parse_device
from .plans import environments_here, named_table


def info():
    """Device, versions, cache location, and which plans exist."""
    import deltaflex
    from deltaflex.tuning.cache import PlanCache

    dev = parse_device(None)
    cache = PlanCache()
    entries = cache.entries()
    usable = sum(e.key.env in environments_here() for e in entries)
    table = Table(title="deltaflex on this machine", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for name, value in {"deltaflex": deltaflex.__version__, **env(dev)}.items():
        add_row(table, name, value)
    add_row(table, "plan cache", str(cache.path))
    add_row(table, "tuned plans", f"{len(entries)} tuned plan(s), {usable} for this machine")
    console.print(table)
    console.print(named_table())
