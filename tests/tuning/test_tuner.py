"""The tuner on CPU: timings are faked where a test needs a given plan to be fastest; every
correctness check is real."""

from types import SimpleNamespace

import pytest
import torch

import deltaflex.api
from deltaflex import Plan, delta_rule
from deltaflex.bench import Shape
from deltaflex.plan import STAGES, default_plan
from deltaflex.testing import make_inputs
from deltaflex.tuning import check, tuner
from deltaflex.tuning.cache import PlanCache
from deltaflex.tuning.tuner import DeviceFault, Evaluator, TuningFailed, is_device_fault, tune

SHAPE = Shape(1, 64, 2, 16, 128)  # a value head dim over 64: the CPU default has chunks of 64
DEFAULT = default_plan("cpu", torch.float32, (SHAPE.K, SHAPE.V))  # eager, chunk 64


def fake_times(monkeypatch, times):
    """Evaluator.time from a table by chunk size; a value that is an exception is raised."""

    def time(self, plan):
        t = times[plan.chunk_size]
        if isinstance(t, BaseException):
            raise t
        return t

    monkeypatch.setattr(Evaluator, "time", time)


def run(trials=8, **kwargs):
    reports = []
    result = tune(SHAPE, device="cpu", dtype=torch.float32, trials=trials, on_trial=reports.append, **kwargs)
    return result, reports


def test_the_fastest_correct_plan_is_saved(monkeypatch):
    fake_times(monkeypatch, {16: 4.0, 32: 1.0, 64: 3.0, 128: 5.0})
    result, reports = run()
    assert result.entry.plan == Plan(chunk_size=32, compile=False)
    assert (result.entry.time_ms, result.entry.default_ms, result.default_ms) == (1.0, 3.0, 3.0)
    assert reports[0].plan == DEFAULT  # the baseline comes first
    assert [r.number for r in reports] == list(range(8)) and result.trials == 8
    assert sum(result.statuses.values()) == 8 and result.statuses["ok"] == 8
    assert 0 < result.entry.error < 1e-4
    assert PlanCache().lookup(result.entry.key) == result.entry
    assert [r.best_ms for r in reports][-1] == 1.0


def test_nothing_beats_the_default_then_the_default_is_saved(monkeypatch):
    fake_times(monkeypatch, {16: 4.0, 32: 5.0, 64: 1.0, 128: 6.0})
    result, _ = run(trials=4)
    assert result.entry.plan == DEFAULT and result.entry.time_ms == result.default_ms == 1.0


def test_a_wrong_plan_is_rejected_whatever_its_speed(monkeypatch):
    fake_times(monkeypatch, {16: 0.01, 32: 2.0, 64: 3.0, 128: 5.0})
    real = check.delta_rule

    def wrong_at_chunk_16(*args, plan, **kwargs):
        o, s = real(*args, plan=plan, **kwargs)
        return (o * 1.01 if plan.chunk_size == 16 else o), s

    monkeypatch.setattr(check, "delta_rule", wrong_at_chunk_16)
    result, reports = run()
    rejected = {r.plan.chunk_size for r in reports if r.outcome.status == "rejected"}
    assert rejected == {16}, "the seeded study should have tried chunk size 16"
    assert result.entry.plan == Plan(chunk_size=32, compile=False)
    assert any("off the float64 oracle" in detail for detail in result.failures)


def test_failing_trials_are_pruned_and_the_study_goes_on(monkeypatch):
    fake_times(monkeypatch, {16: RuntimeError("compile failed: inductor error"), 32: torch.OutOfMemoryError("CUDA OOM"),
                             64: 3.0, 128: 2.0})
    result, reports = run()
    failed = {r.plan.chunk_size: r.outcome.detail for r in reports if r.outcome.status == "failed"}
    assert failed == {16: "RuntimeError: compile failed: inductor error", 32: "out of memory"}
    assert result.entry.plan == Plan(chunk_size=128, compile=False)
    assert result.statuses["failed"] >= 2 and result.statuses["ok"] >= 2


def test_a_plan_that_faults_the_gpu_ends_the_run_and_is_skipped_when_it_resumes(monkeypatch):
    # CUDA's sticky errors leave the process unable to run anything: the run stops at once, naming
    # the plan; the stored study remembers it, so the next run (a new process) does not run it again
    fault = RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")
    fake_times(monkeypatch, {16: fault, 32: 2.0, 64: 3.0, 128: 5.0})
    with pytest.raises(DeviceFault, match="plan C16 .* faulted the GPU .*illegal memory access.*resumes without"):
        run(trials=30)
    fake_times(monkeypatch, {16: 0.5, 32: 2.0, 64: 3.0, 128: 5.0})
    result, reports = run(trials=12)
    at_16 = {r.outcome.detail for r in reports if r.plan.chunk_size == 16}
    assert at_16 == {"faulted the GPU in an earlier run"}, "the resumed study should have sampled C16 again"
    assert result.entry.plan == Plan(chunk_size=32, compile=False)


def test_a_default_plan_that_faults_the_gpu_fails_the_tuning(monkeypatch):
    fake_times(monkeypatch, {16: 1.0, 32: 1.0, 64: RuntimeError("CUDA error: misaligned address"), 128: 1.0})
    with pytest.raises(DeviceFault, match="the default plan failed at 1x64x2x16x128: plan C64 .* faulted the GPU"):
        run()


def test_device_faults_are_told_from_other_errors():
    assert is_device_fault(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_device_fault(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_device_fault(RuntimeError("compile failed: inductor error"))
    assert not is_device_fault(torch.OutOfMemoryError("CUDA out of memory"))


def test_a_run_resumes_the_stored_study(monkeypatch):
    fake_times(monkeypatch, {16: 4.0, 32: 1.0, 64: 3.0, 128: 5.0})
    first, _ = run(trials=3)
    second, reports = run(trials=2)
    assert (first.trials, second.trials) == (3, 5) and [r.number for r in reports] == [3, 4]
    assert second.entry.plan == Plan(chunk_size=32, compile=False)  # known from the first run, re-checked and re-timed here
    assert len(list((PlanCache().directory / "studies").glob("*.log"))) == 1


def test_no_trial_starts_that_would_end_past_the_timeout(monkeypatch):
    fake_times(monkeypatch, {16: 4.0, 32: 1.0, 64: 3.0, 128: 5.0})
    ticks = iter(range(10**6))
    monkeypatch.setattr(tuner, "time", SimpleNamespace(monotonic=lambda: float(next(ticks))))  # 1 s a clock reading
    result, reports = run(trials=50, timeout=12)
    assert 1 <= result.trials < 5  # a trial and the budget check after it read the clock 3 times: 3 "seconds"
    assert PlanCache().lookup(result.entry.key) == result.entry


def test_the_fused_plans_are_tried_first_then_the_space_is_sampled(monkeypatch):
    from deltaflex import plan as plan_module
    from deltaflex.plan import KernelConfig, KernelSpace
    from deltaflex.tuning.space import SearchSpace

    import deltaflex.kernels  # noqa: F401  (imported first, so nothing refills the registry below)

    monkeypatch.setattr(plan_module, "_TRITON_STAGES", dict.fromkeys(
        ("solve", "wy", "state", "output"), KernelSpace(num_warps=(4, 8), num_stages=(2,), default=KernelConfig())))
    space = SearchSpace.for_device("cuda", compile=False)  # a CUDA space, the fused path in it
    monkeypatch.setattr(tuner.SearchSpace, "for_device", classmethod(lambda cls, *a: space))
    fake_times(monkeypatch, {16: 4.0, 32: 2.0, 64: 3.0, 128: 5.0})  # and outcomes: the plans cannot run on the CPU
    monkeypatch.setattr(Evaluator, "_evaluate", lambda self, plan: tuner.Outcome("ok", self.time(plan), 0.0))
    result, reports = run(trials=8)
    fused = [p for p in space.fused_plans(DEFAULT) if p != DEFAULT][:4]
    assert [r.plan for r in reports[:5]] == [DEFAULT, *fused]  # the baseline, then half the trials on the fused plans
    assert [(p.chunk_size, p.state_segment) for p in fused] == [(64, 0), (64, 1), (64, 16), (64, 32)]
    assert len(reports) == 8 and result.entry.time_ms == min(r.outcome.time_ms for r in reports)  # the fastest kept


def test_two_spellings_of_one_computation_are_timed_once_and_noise_is_not_saved(monkeypatch):
    from deltaflex import plan as plan_module
    from deltaflex.plan import KernelConfig, KernelSpace
    from deltaflex.tuning.space import SearchSpace

    import deltaflex.kernels  # noqa: F401

    monkeypatch.setattr(plan_module, "_TRITON_STAGES", dict.fromkeys(
        ("solve", "wy", "state", "output"), KernelSpace(num_warps=(4, 8), num_stages=(2,), default=KernelConfig())))
    space = SearchSpace.for_device("cuda", compile=False)
    monkeypatch.setattr(tuner.SearchSpace, "for_device", classmethod(lambda cls, *a: space))
    fused = space.fused_plans(Plan(chunk_size=64, compile=False, fused=True, **dict.fromkeys(STAGES, "triton")))
    monkeypatch.setattr(tuner, "default_plan", lambda *a: fused[0])  # C64, the state pass automatic
    clock = iter(range(10**6))  # every timing of a C64 plan faster than the last: noise a tuner must not save

    def time(self, plan):
        return 3.0 - next(clock) * 1e-3 if plan.fused and plan.chunk_size == 64 and plan.state_segment < 16 else 10.0

    monkeypatch.setattr(Evaluator, "time", time)
    monkeypatch.setattr(Evaluator, "_evaluate", lambda self, plan: tuner.Outcome("ok", self.time(plan), 0.0))
    evaluator = Evaluator(SHAPE, device=torch.device("cpu"), dtype=torch.float32, mode="fwd")
    assert evaluator.same_as(fused[0]) == evaluator.same_as(fused[1]) == fused[1]  # automatic is one-level here
    assert evaluator.same_as(fused[2]) == fused[2] and fused[2].state_segment == 16  # a given G stays
    result, reports = run(trials=6)
    assert [(r.plan.state_segment, r.repeat) for r in reports[:3]] == [(0, True), (1, True), (16, False)]
    assert result.entry.plan == fused[0] and result.entry.time_ms == result.default_ms  # the default kept


def test_a_broken_default_fails_the_tuning(monkeypatch):
    fake_times(monkeypatch, {16: 1.0, 32: 1.0, 64: RuntimeError("boom"), 128: 1.0})
    with pytest.raises(TuningFailed, match="the default plan .* failed at 1x64x2x16x128: RuntimeError: boom"):
        run()


def test_forward_mode(monkeypatch):
    fake_times(monkeypatch, {16: 4.0, 32: 1.0, 64: 3.0, 128: 5.0})
    result, _ = run(trials=2, mode="fwd")
    assert result.entry.mode == "fwd"


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_evaluator_times_the_mode(mode):
    evaluator = Evaluator(Shape(1, 20, 1, 8, 8), device=torch.device("cpu"), dtype=torch.float32, mode=mode)
    assert evaluator.time(DEFAULT) > 0
    assert all((t.grad is not None) == (mode == "fwdbwd") for t in evaluator.leaves)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="bwd"), "mode must be one of"),
        (dict(trials=0), "trials must be a positive integer"),
        (dict(timeout=-1), "timeout must be a positive number"),
        (dict(device="meta"), "CUDA device or the CPU"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tune(SHAPE, **{"device": "cpu", **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu():
    with pytest.raises(ValueError, match="no CUDA device is available"):
        tune(SHAPE, device="cuda")


@pytest.mark.gpu
def test_tune_on_cuda_then_auto_uses_it(monkeypatch):
    # the CUDA plumbing (do_bench, the GPU's key, auto as the CUDA default); eager plans searched, so the
    # only compiles are the default (compiled) baseline's
    entry = tune(Shape(1, 256, 2, 64, 64), device="cuda", dtype=torch.bfloat16, trials=3, compile=False).entry
    assert entry.key.env.device == torch.cuda.get_device_name() and entry.key.env.capability
    assert entry.time_ms > 0 and entry.error < 1e-2
    # the plan delta_rule resolves (the saved one is often the fused default, which never reaches
    # ChunkDeltaRuleFunction: watch the resolution, not a path)
    seen, resolve = [], deltaflex.api.resolve_plan
    monkeypatch.setattr(deltaflex.api, "resolve_plan", lambda *a, **kw: seen.append(resolve(*a, **kw)) or seen[-1])
    delta_rule(**make_inputs(1, 256, 2, 64, dtype=torch.bfloat16, device="cuda"))  # plan=None on CUDA is "auto"
    assert seen == [entry.plan]
