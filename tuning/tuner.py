"""The tuner: an optuna study over plans for one shape, keeping the fastest plan that is correct.

Each trial builds a plan from the search space, checks it against the float64 oracle (check.py:
a wrong plan is rejected, whatever its speed), then times it at the target shape (median of
`do_bench` on CUDA, of a wall-clock loop on CPU). Plans that fail to compile, run out of memory or
are wrong are pruned and the study goes on; a plan that faults the GPU (a sticky CUDA error) ends
the run, and the stored study skips it when the next run resumes. The default plan is measured
first as the baseline; at the end the best plan and the default are timed again, alternately, in
this process, and the faster of the two is saved to the plan cache, so a saved plan is never
slower than the default.

Where the fused path is in the space, up to half the trials go to its plans first (no graph compile,
the fastest on CUDA: space.py's fused_plans); TPE samples the rest. The study (seeded TPE) is
stored in the cache directory, keyed like the plan cache, so running the same tuning again resumes it.
optuna is imported here only, when a study starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from deltaflex.api import delta_rule
from deltaflex.bench import Shape, time_ms
from deltaflex.plan import Plan, check_available, default_plan
from deltaflex.testing import make_inputs

from .cache import Entry, PlanCache, now_iso
from .check import OracleCheck, PlanRejected
from .key import CacheKey, device_environment
from .space import SearchSpace

MODES = ("fwd", "fwdbwd")
FAULT = "fault"  # a stored trial's status when its plan faulted the GPU


class TuningFailed(Exception):
    pass


class DeviceFault(TuningFailed):
    """A plan faulted the GPU: CUDA's error is sticky, so nothing more can run in this process. The
    stored study remembers the plan, and a new run resumes the study without it."""


# Messages of CUDA's sticky errors, after which every later call in the process fails too.
STICKY_CUDA_ERRORS = ("illegal memory access", "misaligned address", "illegal instruction",
                      "unspecified launch failure", "device-side assert")


def is_device_fault(e: BaseException) -> bool:
    return any(message in str(e) for message in STICKY_CUDA_ERRORS)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one evaluation of a plan found."""

    status: str  # "ok", "rejected" (wrong results) or "failed" (compile error, out of memory, ...)
    time_ms: float | None = None
    error: float | None = None  # worst relative error against the oracle, when checked
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class TrialReport:
    """Handed to the tuner's on_trial callback after each trial."""

    number: int
    plan: Plan
    outcome: Outcome
    repeat: bool  # the plan was already evaluated in this run: its outcome is reused
    best_ms: float | None  # the best time so far in this run


@dataclasses.dataclass(frozen=True)
class TuneResult:
    shape: Shape
    mode: str
    entry: Entry  # what was saved: the best plan, or the default if nothing beat it
    default: Plan
    default_ms: float
    best_found: Plan  # the study's best plan, before the final comparison with the default
    best_found_ms: float
    trials: int  # in the study, earlier runs included
    statuses: dict[str, int]  # outcomes of this run's trials
    failures: dict[str, int]  # distinct failure / rejection details and their counts
    cache_path: Path


class Evaluator:
    """Checks and times plans at one shape; remembers every outcome, so a plan sampled twice (or one
    that computes as an evaluated one does at this shape: `same_as`) is measured once."""

    def __init__(self, shape: Shape, *, device: torch.device, dtype: torch.dtype, mode: str):
        self.shape, self.device, self.dtype, self.mode = shape, device, dtype, mode
        x = make_inputs(shape.B, shape.T, shape.H, shape.K, shape.V, dtype=dtype, device=device)
        self.leaves = [x[n].requires_grad_(mode == "fwdbwd") for n in ("q", "k", "v", "beta")]
        self.do = torch.randn_like(x["v"])
        self.outcomes: dict[Plan, Outcome] = {}
        self._check: OracleCheck | None = None  # made at the first check, as it runs the oracle

    def time(self, plan: Plan) -> float:
        """Median ms of the plan's forward (mode fwd) or forward+backward at the target shape."""
        if self.mode == "fwd":

            def run():
                with torch.no_grad():
                    delta_rule(*self.leaves, plan=plan)

            return time_ms(run, self.device)

        def run():
            delta_rule(*self.leaves, plan=plan)[0].backward(self.do)

        return time_ms(run, self.device, grad_to_none=self.leaves)

    def same_as(self, plan: Plan) -> Plan:
        """The plan as it runs at this shape: a fused plan's state pass as the segment length it
        resolves to (automatic is one-level, or a given G, by the shape), so that two spellings of one
        computation are not timed apart and a timing's noise is never saved as a speed-up."""
        if not plan.fused:
            return plan
        from deltaflex.fused.segments import segment_length

        s = self.shape
        G = segment_length(plan.state_segment, [-(-s.T // plan.chunk_size)] * s.B, s.H, s.K, s.V, self.device)
        return dataclasses.replace(plan, state_segment=G or 1)

    def evaluate(self, plan: Plan) -> Outcome:
        key = self.same_as(plan)
        if key not in self.outcomes:
            self.outcomes[key] = self._evaluate(plan)
        return self.outcomes[key]

    def evaluated(self, plan: Plan) -> bool:
        return self.same_as(plan) in self.outcomes

    def _evaluate(self, plan: Plan) -> Outcome:
        error = None
        try:
            check_available(plan, self.device.type)
            if self._check is None:
                self._check = OracleCheck(K=self.shape.K, V=self.shape.V, dtype=self.dtype, device=self.device)
            error = self._check(plan)
            return Outcome("ok", self.time(plan), error)
        except PlanRejected as e:
            return Outcome("rejected", None, max(e.errors.values()), str(e))
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return Outcome("failed", None, error, "out of memory")
        except Exception as e:  # compile errors and the like: this plan is out, the study goes on
            message = str(e).strip().splitlines()
            detail = f"{type(e).__name__}: {message[0] if message else ''}"[:200]
            if is_device_fault(e):  # ... unless the GPU is left unusable
                raise DeviceFault(f"plan {plan.describe()} faulted the GPU ({detail})") from e
            return Outcome("failed", None, error, detail)


@contextlib.contextmanager
def static_compiles():
    """Every plan compiles static graphs for each shape, as a caller with fixed shapes gets, and the
    many (plan, shape) graphs of a study do not hit Dynamo's recompile limit (past which it would
    silently fall back to eager and the timings would lie)."""
    wanted = dict(automatic_dynamic_shapes=False, recompile_limit=1024, accumulated_recompile_limit=8192)
    config = torch._dynamo.config
    with config.patch(**{name: value for name, value in wanted.items() if hasattr(config, name)}):
        yield


class Budget:
    """A run's wall-clock budget: no trial starts that would end past it, judging by the slowest
    trial so far (a compile can take minutes)."""

    def __init__(self, seconds: float | None):
        self.seconds, self.start, self.slowest = seconds, time.monotonic(), 0.0

    def record(self, seconds: float) -> None:
        self.slowest = max(self.slowest, seconds)

    def room_for_another(self) -> bool:
        return self.seconds is None or time.monotonic() - self.start + self.slowest <= self.seconds


def study_name(key: CacheKey, mode: str) -> str:
    digest = hashlib.sha1(json.dumps(key.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    return f"{mode}-{digest}"


def _check_arguments(device: torch.device, mode: str, trials: int, timeout: float | None) -> None:
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be a CUDA device or the CPU, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but no CUDA device is available")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")


def tune(
    shape: Shape,
    *,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    mode: str = "fwdbwd",
    trials: int = 20,
    timeout: float | None = None,
    seed: int = 0,
    compile: bool | None = None,
    max_autotune: bool = False,
    cache: PlanCache | None = None,
    on_trial: Callable[[TrialReport], None] | None = None,
) -> TuneResult:
    """Tunes the plan for one shape and saves the winner to the plan cache.

    trials: new trials to run (the default plan's baseline trial counts among them);
    timeout: seconds for the whole run, baseline included; no trial starts that would end past it,
    judging by the slowest trial so far. compile, max_autotune: see SearchSpace.for_device.
    """
    device = torch.device(device)
    _check_arguments(device, mode, trials, timeout)
    budget = Budget(timeout)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cache = cache or PlanCache()
    key = CacheKey.for_shape(device_environment(device), dtype, shape.B, shape.T, shape.H, shape.K, shape.V)
    space = SearchSpace.for_device(device.type, compile, max_autotune)
    default = default_plan(device.type, dtype, (shape.K, shape.V))
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    with on_device, static_compiles():
        evaluator = Evaluator(shape, device=device, dtype=dtype, mode=mode)
        try:
            baseline = evaluator.evaluate(default)
        except DeviceFault as e:
            raise DeviceFault(f"the default plan failed at {shape}: {e}") from e
        if baseline.status != "ok":
            raise TuningFailed(f"the default plan ({default.describe()}) failed at {shape}: {baseline.detail}")
        budget.record(time.monotonic() - budget.start)
        study, statuses, failures = _run_study(evaluator, space, default, key, cache, trials, budget, seed, on_trial)
        best, best_ms = _best_plan(study, evaluator, default)
        default_ms, best_ms = _compare(evaluator, default, best)

    winner, winner_ms = (best, best_ms) if best_ms < default_ms else (default, default_ms)
    entry = Entry(
        key=key, plan=winner, time_ms=winner_ms, default_ms=default_ms, mode=mode, shape=str(shape),
        error=evaluator.evaluate(winner).error, trials=len(study.trials), tuned_at=now_iso(),
    )
    cache.save(entry)
    return TuneResult(shape, mode, entry, default, default_ms, best, best_ms, len(study.trials), statuses, failures, cache.path)


def _run_study(evaluator, space, default, key, cache, trials, budget, seed, on_trial):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies = cache.directory / "studies"
    studies.mkdir(parents=True, exist_ok=True)
    name = study_name(key, evaluator.mode)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(studies / f"{name}.log")))
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
    # A resumed study continues the seed's sequence instead of replaying the first run's trials.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), n_startup_trials=5)
    # The default first (the baseline), then up to half the trials on the fused plans (space.py says why);
    # TPE samples the rest of the space. A resumed study skips what it has run.
    for plan in [default, *[p for p in space.fused_plans(default) if p != default][: trials // 2]]:
        params = space.params(plan)
        if params is not None:
            study.enqueue_trial(params, skip_if_exists=True)

    statuses, failures, best = Counter(), Counter(), [None]
    faulted = {t.user_attrs.get("plan") for t in study.trials if t.user_attrs.get("status") == FAULT}

    def objective(trial):
        plan = space.suggest(trial)
        repeat = evaluator.evaluated(plan)
        plan_json = plan.to_json()
        trial.set_user_attr("plan", plan_json)
        start = time.monotonic()
        if plan_json in faulted:  # not run again: it would take the GPU down with it
            outcome = Outcome("failed", detail="faulted the GPU in an earlier run")
        else:
            try:
                outcome = evaluator.evaluate(plan)
            except DeviceFault as e:
                trial.set_user_attr("status", FAULT)  # the trial fails, the study stores it, the run ends
                raise DeviceFault(f"{e}; run the tuning again: the stored study resumes without this plan") from e
        budget.record(time.monotonic() - start)
        trial.set_user_attr("status", outcome.status)
        if outcome.detail:
            trial.set_user_attr("detail", outcome.detail)
        statuses[outcome.status] += 1
        if outcome.status == "ok" and (best[0] is None or outcome.time_ms < best[0]):
            best[0] = outcome.time_ms
        if outcome.status != "ok":
            failures[outcome.detail] += 1
        if on_trial is not None:
            on_trial(TrialReport(trial.number, plan, outcome, repeat, best[0]))
        if outcome.status != "ok":
            raise optuna.TrialPruned(outcome.detail)
        return outcome.time_ms

    def stop_in_time(study, trial):
        if not budget.room_for_another():
            study.stop()

    if budget.room_for_another():
        study.optimize(objective, n_trials=trials, callbacks=[stop_in_time])
    return study, dict(statuses), dict(failures)


def _best_plan(study, evaluator: Evaluator, default: Plan) -> tuple[Plan, float]:
    """The fastest correct plan of the study (earlier runs included), re-evaluated here when an
    earlier run found it."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and "plan" in t.user_attrs]
    for trial in sorted(done, key=lambda t: t.value):
        try:
            plan = Plan.from_json(trial.user_attrs["plan"])
        except (TypeError, ValueError):
            continue
        outcome = evaluator.evaluate(plan)
        if outcome.status == "ok":
            return plan, outcome.time_ms
    return default, evaluator.evaluate(default).time_ms


def _compare(evaluator: Evaluator, default: Plan, best: Plan, rounds: int = 2) -> tuple[float, float]:
    """(default ms, best ms), timed alternately in this process; the minimum of each plan's medians."""
    if evaluator.same_as(best) == evaluator.same_as(default):
        t = min(evaluator.time(default) for _ in range(rounds))
        return t, t
    times = {default: math.inf, best: math.inf}
    for _ in range(rounds):
        for plan in (default, best):
            times[plan] = min(times[plan], evaluator.time(plan))
    return times[default], times[best]
