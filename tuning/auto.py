"""plan="auto": the cached best plan for the caller's device, dtype and shape, else the tested default.

Called on every delta_rule call, possibly while a caller's torch.compile traces it, so: no tensor
data access, no I/O after the first lookup of a key in a process, and the lookup itself is marked
as a constant for Dynamo (it runs at trace time, and the resulting Plan is baked into the graph).
The shape buckets are computed outside it, by comparisons Dynamo can guard on.
"""

from __future__ import annotations

import functools

import torch

from deltaflex.plan import Plan, check_available, default_plan

from .cache import PlanCache, cache_dir, generation, warn_once
from .key import DTYPE_NAMES, CacheKey, environment, shape_buckets


# Every plan auto has handed out, append-only. The constant Dynamo bakes in is an index into this
# list: a Plan returned by a constant-marked function could not be guarded on, a global list can.
_handed_out: list[Plan] = []
_index: dict[Plan, int] = {}


def auto_plan(device: torch.device, dtype: torch.dtype, B: int, T: int, H: int, K: int, V: int) -> Plan:
    return _handed_out[_lookup(device.type, device.index, dtype, K, V, *shape_buckets(B, T, H))]


@torch.compiler.assume_constant_result
def _lookup(device_type: str, index: int | None, dtype: torch.dtype, K: int, V: int, T_bucket: int, BH_bucket: int) -> int:
    """The index in _handed_out of the plan for this key (from the cache file, read once)."""
    plan = _memo(generation(), str(cache_dir()), device_type, index, dtype, K, V, T_bucket, BH_bucket)
    if plan not in _index:
        _index[plan] = len(_handed_out)
        _handed_out.append(plan)
    return _index[plan]


@functools.cache
def _memo(generation: int, directory: str, device_type, index, dtype, K, V, T_bucket, BH_bucket) -> Plan:
    if device_type not in ("cuda", "cpu"):
        return default_plan(device_type, dtype, (K, V))
    key = CacheKey(environment(device_type, index), DTYPE_NAMES[dtype], K, V, T_bucket, BH_bucket)
    entry = PlanCache(directory).lookup(key)
    if entry is None:
        return default_plan(device_type, dtype, (K, V))
    try:
        check_available(entry.plan, device_type)
    except (NotImplementedError, ValueError) as e:
        warn_once(f"the cached plan for {key.describe()} cannot run here ({e}); using the default plan")
        return default_plan(device_type, dtype, (K, V))
    return entry.plan
