"""The tuner's search space, derived from what the Plan record and the backend registry offer.

Dimensions: where every stage has a hand-written kernel, first whether to take the fused path
(deltaflex/fused: chunk sizes up to 64, its own launch parameters, its forward's state pass: one-level or
in segments of G chunks); else the chunk size; per stage,
its available backends (only "compiled" until a hand-written kernel registers); per hand-written
stage, its block sizes, num_warps and num_stages; whether to compile, torch.compile's mode and, on
CUDA, the compiled plan's state grouping and CUDA graphs. A dimension with one choice is fixed, not
searched, so the space grows as stages land without anything here changing.
"""

from __future__ import annotations

import dataclasses

from deltaflex.plan import (CHUNK_SIZES, FUSED_CHUNK_SIZES, STAGES, TRITON_DEVICE_TYPES, KernelConfig, KernelSpace, Plan,
                            available_backends, kernel_space)


# What a compiled plan may vary on a GPU: fewer sequential state-pass steps (state_group) and
# CUDA-graph replay, the two levers of the compiled plan's speed (docs/design-compiled.md).
COMPILED_OPTIONS_CUDA = (("state_group", (1, 4, 8)), ("cuda_graph", (False, True)))
# The fused forward's state pass: automatic, one-level, or two-level in segments of G chunks (prefill).
FUSED_STATE_SEGMENTS = (0, 1, 16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    chunk_sizes: tuple[int, ...]
    backends: tuple[tuple[str, tuple[str, ...]], ...]  # stage -> backends
    kernels: tuple[tuple[str, KernelSpace], ...]  # stage -> its hand-written kernel's space
    compile: tuple[bool, ...]
    compile_modes: tuple[str, ...]
    # Plan fields searched for compiled plans only, e.g. the two-level state pass and CUDA graphs.
    compiled_options: tuple[tuple[str, tuple], ...] = ()

    @classmethod
    def for_device(cls, device_type: str, compile: bool | None = None, max_autotune: bool = False) -> SearchSpace:
        """compile=None: on CUDA search eager and compiled plans; on CPU eager ones only, since a
        compile costs tens of seconds a graph there. True: both, anywhere. False: eager only.
        max_autotune: also torch.compile's max-autotune mode, whose compiles take minutes."""
        if compile is None:
            compile = device_type == "cuda"
        # Hand-written kernels on CUDA only: Triton's CPU interpreter (tests) is no plan to tune.
        backends = tuple(
            (stage, tuple(b for b in available_backends(stage, device_type) if b != "triton" or device_type in TRITON_DEVICE_TYPES))
            for stage in STAGES
        )
        kernels = tuple((stage, kernel_space(stage)) for stage, choices in backends if "triton" in choices)
        modes = ("default", "max-autotune-no-cudagraphs") if max_autotune else ("default",)
        options = COMPILED_OPTIONS_CUDA if device_type == "cuda" else ()
        return cls(CHUNK_SIZES, backends, kernels, (False, True) if compile else (False,), modes, options)

    def suggest(self, trial) -> Plan:
        """The plan an optuna trial samples (define-by-run: kernel and compile-mode dimensions only
        exist where they apply)."""
        all_triton = all("triton" in choices for _, choices in self.backends)
        if all_triton and _pick(trial, "fused", (False, True)):
            chunk_sizes = tuple(c for c in self.chunk_sizes if c in FUSED_CHUNK_SIZES)
            return _fused_plan(_pick(trial, "fused.chunk_size", chunk_sizes),
                               _pick(trial, "fused.state_segment", FUSED_STATE_SEGMENTS))
        fields = {"chunk_size": _pick(trial, "chunk_size", self.chunk_sizes)}
        kernels = dict(self.kernels)
        for stage, choices in self.backends:
            fields[stage] = _pick(trial, stage, choices)
            if fields[stage] == "triton":
                space = kernels[stage]
                fields[f"{stage}_kernel"] = KernelConfig(
                    {name: _pick(trial, f"{stage}.{name}", sizes) for name, sizes in space.blocks},
                    _pick(trial, f"{stage}.num_warps", space.num_warps),
                    _pick(trial, f"{stage}.num_stages", space.num_stages),
                )
        fields["compile"] = _pick(trial, "compile", self.compile)
        if fields["compile"]:
            fields["compile_mode"] = _pick(trial, "compile_mode", self.compile_modes)
            fields.update({name: _pick(trial, name, choices) for name, choices in self.compiled_options})
        return Plan(**fields)

    def fused_plans(self, first: Plan) -> list[Plan]:
        """The fused path's plans (none where a stage lacks a kernel), in the order the tuner tries them
        before it samples: `first`'s chunk size, then the larger before the smaller, each with its state
        pass automatic, one-level, then in segments. They cost no graph compile, and on CUDA they are the
        fastest plans measured (docs/benchmarks.md), so a short run spends its trials there first."""
        if not all("triton" in choices for _, choices in self.backends):
            return []
        sizes = sorted((c for c in self.chunk_sizes if c in FUSED_CHUNK_SIZES), key=lambda c: (c != first.chunk_size, -c))
        return [_fused_plan(c, g) for c in sizes for g in FUSED_STATE_SEGMENTS]

    def params(self, plan: Plan) -> dict | None:
        """The trial parameters that make `suggest` return `plan`, or None if it is outside the space."""
        recorder = _Recorder(plan)
        try:
            suggested = self.suggest(recorder)
        except _Outside:
            return None
        return recorder.params if suggested == _explicit(plan) else None

    def size(self) -> int:
        """How many distinct plans the space holds."""
        per_stage, kernels = 1, dict(self.kernels)
        all_triton = all("triton" in choices for _, choices in self.backends)
        for stage, choices in self.backends:
            hand_written = 0
            if "triton" in choices:
                space = kernels[stage]
                hand_written = len(space.num_warps) * len(space.num_stages)
                for _, sizes in space.blocks:
                    hand_written *= len(sizes)
            per_stage *= hand_written + ("compiled" in choices)
        per_compiled = len(self.compile_modes)
        for _, choices in self.compiled_options:
            per_compiled *= len(choices)
        compiles = sum(per_compiled if c else 1 for c in self.compile)
        fused = len([c for c in self.chunk_sizes if c in FUSED_CHUNK_SIZES]) * len(FUSED_STATE_SEGMENTS) if all_triton else 0
        return len(self.chunk_sizes) * per_stage * compiles + fused


def _explicit(plan: Plan) -> Plan:
    """The plan with its hand-written stages' default launch configurations spelled out."""
    if plan.fused:
        return plan
    return dataclasses.replace(plan, **{f"{s}_kernel": plan.kernel(s) for s in STAGES if getattr(plan, s) == "triton"})


def _fused_plan(chunk_size: int, state_segment: int) -> Plan:
    return Plan(chunk_size=chunk_size, compile=False, fused=True, state_segment=state_segment,
                **{stage: "triton" for stage in STAGES})


def _pick(trial, name: str, choices: tuple):
    return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, choices)


class _Outside(Exception):
    pass


class _Recorder:
    """Stands in for an optuna trial: answers each question with the given plan's value."""

    def __init__(self, plan: Plan):
        self.params: dict = {}
        values = {**dataclasses.asdict(plan), "fused.chunk_size": plan.chunk_size,
                  "fused.state_segment": plan.state_segment}
        for stage in STAGES:
            config = plan.kernel(stage)
            if config is not None:
                values.update({f"{stage}.{n}": s for n, s in config.blocks})
                values.update({f"{stage}.num_warps": config.num_warps, f"{stage}.num_stages": config.num_stages})
        self._values = values

    def suggest_categorical(self, name: str, choices):
        value = self._values.get(name)
        if value not in choices:
            raise _Outside(name)
        self.params[name] = value
        return value
