"""`deltaflex info`: device, versions, the plan cache and which plans exist."""

from __future__ import annotations

from .common import console, env, parse_device, say
from .plans import environments_here, named_table


def info():
    """Device, versions, cache location, and which plans exist."""
    import deltaflex
    from deltaflex.tuning.cache import PlanCache

    dev = parse_device(None)
    console.print({"deltaflex": deltaflex.__version__, **env(dev)})
    cache = PlanCache()
    entries = cache.entries()
    here = environments_here()
    usable = sum(e.key.env in here for e in entries)
    say(f"plan cache: {cache.path} ({len(entries)} tuned plan(s), {usable} for this machine)")
    console.print(named_table())
