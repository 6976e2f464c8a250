"""plan="auto": the tuned plan for the caller's device, dtype and shape, else the default."""

import dataclasses

import pytest
import torch

import deltaflex.api
from deltaflex import Plan, delta_rule
from deltaflex.plan import default_plan
from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import make_inputs, relative_error
from deltaflex.tuning import auto
from deltaflex.tuning.cache import Entry, PlanCache, PlanCacheWarning
from deltaflex.tuning.key import CacheKey, environment

TUNED = Plan(chunk_size=16, compile=False)


def save(plan=TUNED, B=1, T=100, H=2, K=16, V=16, dtype=torch.float32, env=None):
    key = CacheKey.for_shape(env or environment("cpu"), dtype, B, T, H, K, V)
    PlanCache().save(Entry(key, plan, 1.0, 2.0, "fwdbwd", f"{B}x{T}x{H}x{K}", 1e-7, 3, "2026-11-28T00:00:00Z"))


def plans_used(monkeypatch):
    """The plans delta_rule hands to the autograd.Function."""
    seen, apply = [], deltaflex.api.ChunkDeltaRuleFunction.apply
    monkeypatch.setattr(deltaflex.api.ChunkDeltaRuleFunction, "apply", lambda *a: (seen.extend(x for x in a if isinstance(x, Plan)), apply(*a))[1])
    return seen


def lookup(B=1, T=100, H=2, K=16, V=16, dtype=torch.float32):
    return auto.auto_plan(torch.device("cpu"), dtype, B, T, H, K, V)


def test_default_without_a_tuned_plan():
    assert lookup() == default_plan("cpu", torch.float32, (16, 16))


def test_tuned_plan_by_bucket(monkeypatch):
    save()
    assert lookup() == TUNED
    assert lookup(T=65) == TUNED and lookup(B=2, H=1) == TUNED  # same buckets (T <= 128, B*H <= 2)
    assert lookup(T=129) == default_plan("cpu", torch.float32, (16, 16)) and lookup(K=32) == default_plan("cpu", torch.float32, (16, 16))
    assert lookup(dtype=torch.float64) == default_plan("cpu", torch.float32, (16, 16))
    seen = plans_used(monkeypatch)
    x = make_inputs(1, 100, 2, 16, dtype=torch.float32)
    o, _ = delta_rule(**x, plan="auto")
    assert seen == [TUNED]
    assert relative_error(o, recurrent_delta_rule_ref(**x)[0]) < 1e-4
    delta_rule(**x, plan="auto", chunk_size=32)  # an explicit chunk size still wins
    assert seen[-1] == dataclasses.replace(TUNED, chunk_size=32)


def test_a_new_tuned_plan_is_seen_without_restarting():
    assert lookup() == default_plan("cpu", torch.float32, (16, 16))
    save()
    assert lookup() == TUNED
    save(plan=Plan(chunk_size=128, compile=False))
    assert lookup().chunk_size == 128


def test_lookup_reads_the_file_once(monkeypatch):
    save()
    assert lookup() == TUNED
    monkeypatch.setattr(PlanCache, "entries", lambda self: pytest.fail("read the cache file again"))
    for T in (70, 100, 128):
        assert lookup(T=T) == TUNED


def test_cached_plan_that_cannot_run_here_falls_back_to_the_default(monkeypatch):
    monkeypatch.setattr("deltaflex.plan.triton_device_types", lambda: ("cuda",))  # a CPU without Triton's interpreter
    save(plan=Plan(chunk_size=32, state="triton"))  # hand-written kernels run on CUDA only
    with pytest.warns(PlanCacheWarning, match="cannot run here"):
        assert lookup() == default_plan("cpu", torch.float32, (16, 16))


def test_plans_of_other_versions_are_not_used():
    save(env=dataclasses.replace(environment("cpu"), deltaflex="0.0.1"))
    with pytest.warns(PlanCacheWarning, match="other versions"):
        assert lookup() == default_plan("cpu", torch.float32, (16, 16))


@pytest.mark.compile
def test_auto_inside_callers_fullgraph_compile():
    # The lookup (file read included) runs at trace time as a constant: no graph break.
    tuned = Plan(chunk_size=32, compile=False)
    save(plan=tuned, T=40)
    torch._dynamo.reset()
    x = make_inputs(1, 40, 2, 16, dtype=torch.float32)
    compiled = torch.compile(lambda q, k, v, beta: delta_rule(q, k, v, beta, plan="auto")[0], fullgraph=True)
    with torch.no_grad():
        o = compiled(**x)
    assert tuned in auto._handed_out  # the lookup found the tuned plan while tracing
    assert relative_error(o, recurrent_delta_rule_ref(**x)[0]) < 1e-4
