"""Plans: how `delta_rule` computes, as a small frozen, JSON-serialisable record.

A plan names the chunk size, a backend for each stage (`compiled`: blocked PyTorch ops, through
torch.compile unless `compile` is off; `triton`: hand-written kernels), the launch configuration of
each hand-written stage, and the compile options. Plans are hashable, so the autograd.Function can
take one as a plain argument.

Which backends exist is a registry, not a constant: a hand-written stage kernel announces itself
with `register_triton_stage(stage, KernelSpace(...))` (deltaflex.kernels does for all four stages
when it is imported, which happens on first need), and from then on plans may use it and the tuner
searches its launch configurations. Without Triton only the compiled backend is available.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import torch

from .chunk.matmul import POLICIES
from .validation import CHUNK_SIZES, check_chunk_size, config_fields

STAGES = ("solve", "wy", "state", "output")
BACKENDS = ("compiled", "triton")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")  # torch.compile's `mode`
PRECISIONS = ("auto", *POLICIES)  # matmul policy of the chunk stages (chunk/matmul.py)
STATE_GROUPS = (1, 2, 4, 8, 16)
FUSED_CHUNK_SIZES = (16, 32, 64)  # the fused path's inverse (deltaflex/fused/prepare.py)
STATE_SEGMENTS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)  # 0: automatic, 1: one-level (deltaflex/fused/segments.py)
TRITON_DEVICE_TYPES = ("cuda",)
NUM_WARPS = (1, 2, 4, 8, 16, 32)
BLOCK_SIZES = (16, 32, 64, 128, 256)  # tl.arange needs powers of two


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """The launch configuration of one hand-written stage kernel.

    `blocks` maps the kernel's block-size names (e.g. "BK", "BV") to sizes; it may be given as a
    dict and is stored as sorted (name, size) pairs, so the config stays hashable.
    """

    blocks: tuple[tuple[str, int], ...] = ()
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        blocks = self.blocks
        if isinstance(blocks, Mapping):
            blocks = tuple(blocks.items())
        if not isinstance(blocks, (tuple, list)) or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in blocks):
            raise TypeError(f"KernelConfig.blocks must map block names to sizes, got {self.blocks!r}")
        blocks = tuple(sorted((name, size) for name, size in blocks))
        for name, size in blocks:
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"KernelConfig block names must be identifiers, got {name!r}")
            if not _is_int(size) or size not in BLOCK_SIZES:
                raise ValueError(f"KernelConfig block {name!r} must be one of {BLOCK_SIZES}, got {size!r}")
        if len({name for name, _ in blocks}) != len(blocks):
            raise ValueError(f"KernelConfig block names must be unique, got {[n for n, _ in blocks]}")
        if not _is_int(self.num_warps) or self.num_warps not in NUM_WARPS:
            raise ValueError(f"KernelConfig.num_warps must be one of {NUM_WARPS}, got {self.num_warps!r}")
        if not _is_int(self.num_stages) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"KernelConfig.num_stages must be an integer in [1, 8], got {self.num_stages!r}")
        object.__setattr__(self, "blocks", blocks)

    def to_dict(self) -> dict:
        return {"blocks": dict(self.blocks), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @classmethod
    def from_dict(cls, data) -> KernelConfig:
        return cls(**config_fields(cls, data, "KernelConfig"))


@dataclasses.dataclass(frozen=True)
class KernelSpace:
    """What a hand-written stage kernel lets the tuner vary, and its untuned configuration."""

    blocks: tuple[tuple[str, tuple[int, ...]], ...] = ()  # block name -> allowed sizes
    num_warps: tuple[int, ...] = (2, 4, 8)
    num_stages: tuple[int, ...] = (1, 2, 3)
    default: KernelConfig = KernelConfig()

    def __post_init__(self):
        blocks = tuple(sorted((name, tuple(sizes)) for name, sizes in dict(self.blocks).items()))
        object.__setattr__(self, "blocks", blocks)
        for name, sizes in blocks:  # every choice must be a valid config
            for size in sizes:
                KernelConfig({name: size})
        for w in self.num_warps:
            KernelConfig(num_warps=w)
        for s in self.num_stages:
            KernelConfig(num_stages=s)
        self.check(self.default)

    def check(self, config: KernelConfig) -> None:
        names = [name for name, _ in self.blocks]
        if [name for name, _ in config.blocks] != names:
            raise ValueError(f"this kernel takes blocks {names}, got {dict(config.blocks)}")


_TRITON_STAGES: dict[str, KernelSpace] = {}


def register_triton_stage(stage: str, space: KernelSpace) -> None:
    """Called by a hand-written stage kernel's module when it is imported: plans may now use it."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if not isinstance(space, KernelSpace):
        raise TypeError(f"space must be a KernelSpace, got {type(space).__name__}")
    _TRITON_STAGES[stage] = space


def _load_kernels() -> None:
    # deltaflex.kernels registers its stages on import; without Triton there are none.
    try:
        from . import kernels  # noqa: F401
    except ImportError:
        pass


def kernel_space(stage: str) -> KernelSpace | None:
    """The registered hand-written kernel's search space for `stage`, or None."""
    _load_kernels()
    return _TRITON_STAGES.get(stage)


def triton_device_types() -> tuple[str, ...]:
    """Where the hand-written kernels run: CUDA, and the CPU in Triton's interpreter (TRITON_INTERPRET=1
    set before deltaflex.kernels was imported; tests)."""
    _load_kernels()
    from .kernels.common import INTERPRETED

    return TRITON_DEVICE_TYPES + (("cpu",) if INTERPRETED else ())


def available_backends(stage: str, device_type: str = "cuda") -> tuple[str, ...]:
    """The backends a plan may use for `stage` on this device type."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if kernel_space(stage) is not None and device_type in triton_device_types():
        return ("compiled", "triton")
    return ("compiled",)


@dataclasses.dataclass(frozen=True)
class Plan:
    chunk_size: int = 64
    solve: str = "compiled"  # kkt + solve: A and T = (I + A)^-1 per chunk
    wy: str = "compiled"  # W = T beta K, U = T beta V
    state: str = "compiled"  # the sequential pass across chunks
    output: str = "compiled"  # O from Q, K, V_new and the chunk states
    compile: bool = True  # False runs the compiled-backend stages eagerly (debugging, CPU)
    compile_mode: str = "default"  # torch.compile's mode for the compiled-backend stages
    unroll: bool = False  # compiled state pass as an unrolled loop, not the scan op (one graph per T)
    state_group: int = 1  # > 1: two-level state pass over groups of this many chunks (chunk/state.py)
    cuda_graph: bool = False  # replay the compiled graphs under CUDA graphs, one capture per shape
    # All-Triton plans: the fused path (deltaflex/fused/chunk.py: 2 or 3 forward, 5 backward launches,
    # its own precision scheme) instead of the stage-by-stage kernels; chunk sizes 16 to 64.
    fused: bool = False
    # The fused forward's state pass: 0 chooses from the shape and the GPU (fused/segments.py), 1 takes
    # the one-level pass, G the two-level, sequence-parallel pass in segments of G chunks (prefill).
    state_segment: int = 0
    precision: str = "auto"  # matmul policy; auto: see precision_for
    # Launch configurations of the hand-written stages; None: the kernel's own default.
    solve_kernel: KernelConfig | None = None
    wy_kernel: KernelConfig | None = None
    state_kernel: KernelConfig | None = None
    output_kernel: KernelConfig | None = None

    def __post_init__(self):
        check_chunk_size(self.chunk_size)
        for stage in STAGES:
            backend = getattr(self, stage)
            if backend not in BACKENDS:
                raise ValueError(f"plan stage {stage!r} must use one of {BACKENDS}, got {backend!r}")
            config = getattr(self, f"{stage}_kernel")
            if config is not None:
                if isinstance(config, Mapping):  # as read from JSON
                    config = KernelConfig.from_dict(config)
                    object.__setattr__(self, f"{stage}_kernel", config)
                if not isinstance(config, KernelConfig):
                    raise TypeError(f"plan {stage}_kernel must be a KernelConfig or None, got {type(config).__name__}")
                if backend != "triton":
                    raise ValueError(
                        f"plan {stage}_kernel configures a hand-written kernel, but stage {stage!r} uses {backend!r}"
                    )
        if not isinstance(self.compile, bool):
            raise TypeError(f"plan compile must be True or False, got {self.compile!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"plan compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if not self.compile and self.compile_mode != "default":
            raise ValueError(f"plan compile_mode {self.compile_mode!r} needs compile=True")
        for flag in ("unroll", "cuda_graph", "fused"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"plan {flag} must be True or False, got {getattr(self, flag)!r}")
        if self.cuda_graph and not self.compile:
            raise ValueError("plan cuda_graph replays the compiled graphs and needs compile=True")
        if self.fused:
            if any(getattr(self, stage) != "triton" for stage in STAGES) or self.compile:
                raise ValueError("plan fused is the fused Triton path: it needs every stage on 'triton' and compile=False")
            if self.chunk_size not in FUSED_CHUNK_SIZES:
                raise ValueError(f"plan fused takes chunk sizes {FUSED_CHUNK_SIZES}, got chunk_size={self.chunk_size}")
            if self.precision != "auto" or self.state_group != 1:
                raise ValueError("plan fused has its own precision scheme and a one-level state pass: "
                                 "leave precision='auto' and state_group=1")
            if any(getattr(self, f"{stage}_kernel") is not None for stage in STAGES):
                raise ValueError("plan fused runs none of the stage kernels: leave the *_kernel configurations unset")
        if self.state_segment not in STATE_SEGMENTS or not _is_int(self.state_segment):
            raise ValueError(f"plan state_segment must be one of {STATE_SEGMENTS}, got {self.state_segment!r}")
        if self.state_segment and not self.fused:
            raise ValueError("plan state_segment chooses the fused path's state pass: it needs fused=True "
                             "(compiled plans group chunks with state_group)")
        if self.state_group not in STATE_GROUPS:
            raise ValueError(f"plan state_group must be one of {STATE_GROUPS}, got {self.state_group!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"plan precision must be one of {PRECISIONS}, got {self.precision!r}")

    def precision_for(self, device_type: str) -> str:
        """The matmul policy to run with on `device_type`. "auto": bf16x3 for all-Triton plans on CUDA
        (on the H200 twice as fast as fp32's 3xTF32 products, same error against the oracle:
        docs/benchmarks-history.md), fp32 otherwise (the compiled stages' bf16x3 splits cost more
        launches than they save there)."""
        if self.precision != "auto":
            return self.precision
        all_triton = all(backend == "triton" for backend in self.backends().values())
        return "bf16x3" if device_type == "cuda" and all_triton else "fp32"

    def backends(self) -> dict[str, str]:
        return {stage: getattr(self, stage) for stage in STAGES}

    def kernel(self, stage: str) -> KernelConfig | None:
        """The launch configuration of a hand-written stage as the tuner spells it out: the plan's,
        else the kernel's default. (At run time a stage without one uses the kernel's own table,
        chosen per head dim and chunk size.)"""
        if getattr(self, stage) != "triton" or self.fused:
            return None
        config = getattr(self, f"{stage}_kernel")
        space = kernel_space(stage)
        return config if config is not None or space is None else space.default

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for stage in STAGES:
            config = getattr(self, f"{stage}_kernel")
            out[f"{stage}_kernel"] = None if config is None else config.to_dict()
        return out

    @classmethod
    def from_dict(cls, data) -> Plan:
        return cls(**config_fields(cls, data, "Plan"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"a plan must be a JSON object: {e}") from e
        return cls.from_dict(data)

    def describe(self) -> str:
        """One line for tables: 'C64 compiled', 'C64 eager', 'C64 fused', 'C64 triton stages' (every
        stage a hand-written kernel) or 'C128 compiled, triton state[BK=64 w4 s2]' (compiled stages
        with one hand-written stage)."""
        if self.fused:
            segment = {0: "", 1: ", one-level state"}.get(self.state_segment, f", segments of {self.state_segment}")
            return f"C{self.chunk_size} fused{segment}"
        hand = [s for s in STAGES if getattr(self, s) == "triton"]
        extras = [f"precision={self.precision}"] if self.precision != "auto" else []
        extras += ["unrolled"] if self.unroll else []
        extras += [f"state_group={self.state_group}"] if self.state_group > 1 else []
        extras += ["cuda graphs"] if self.cuda_graph else []
        if len(hand) == len(STAGES):  # nothing runs as blocked ops: only the glue between kernels
            glue = [f"{self._compiler()} glue"] if self.compile else []
            launches = [f"{s}{_launch(getattr(self, f'{s}_kernel'))}" for s in hand if getattr(self, f"{s}_kernel")]
            return ", ".join([f"C{self.chunk_size} triton stages", *glue, *extras, *launches])
        mixed = [f"triton {s}{_launch(getattr(self, f'{s}_kernel'))}" for s in hand]
        return ", ".join([f"C{self.chunk_size} {self._compiler()}", *extras, *mixed])

    def _compiler(self) -> str:
        if not self.compile:
            return "eager"
        return "compiled" if self.compile_mode == "default" else f"compiled({self.compile_mode})"


def _launch(config: KernelConfig | None) -> str:
    if config is None:
        return ""
    return "[" + " ".join([f"{n}={s}" for n, s in config.blocks] + [f"w{config.num_warps}", f"s{config.num_stages}"]) + "]"


NAMED_PLANS = {
    "eager": Plan(compile=False),
    "compiled": Plan(),
    # hand-written Triton kernels (deltaflex.kernels) for every stage; their glue runs eagerly
    "triton": Plan(**{stage: "triton" for stage in STAGES}, compile=False),
    # the fused Triton path (deltaflex/fused): the default on CUDA
    "fused": Plan(**{stage: "triton" for stage in STAGES}, compile=False, fused=True),
    # Compiled stages with one hand-written stage, e.g. "mixed-state": the single-launch Triton state pass.
    **{f"mixed-{stage}": Plan(**{stage: "triton"}) for stage in STAGES},
}
PLAN_NAMES = (*NAMED_PLANS, "auto")
CPU_SMALL_HEADS = Plan(chunk_size=32, compile=False)  # the CPU default for head dims up to 64


def plan_from_spec(spec: str) -> Plan:
    """A plan from a command line: a plan name, Plan fields as "field=value,..." (e.g.
    "state_group=8,cuda_graph=1"), or a name followed by fields ("triton,precision=bf16")."""
    name, *items = spec.split(",")
    if "=" in name:
        name, items = "compiled", [name, *items]
    if name not in NAMED_PLANS:
        raise ValueError(f"a plan spec starts with one of {tuple(NAMED_PLANS)} or a field=value, got {spec!r}")
    fields = {f.name: f.default for f in dataclasses.fields(Plan) if not f.name.endswith("_kernel")}
    changes = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields or not value:
            raise ValueError(f"{item!r} in plan spec {spec!r} is not field=value with a field of {sorted(fields)}")
        kind = type(fields[key])
        try:
            changes[key] = bool(int(value)) if kind is bool else int(value) if kind is int else value
        except ValueError:
            raise ValueError(f"plan field {key} takes {kind.__name__} values, got {value!r} in {spec!r}") from None
    return dataclasses.replace(NAMED_PLANS[name], **changes)


def default_plan(device_type: str, dtype=None, head_dims: tuple[int, int] | None = None) -> Plan:
    """The tested default when nothing is tuned: on CUDA the fused Triton path ("fused", the fastest
    measured: docs/benchmarks.md) where it has been checked on the H200 (bf16 inputs, key and value
    head dims of 64 or more), else the stage-by-stage kernels ("triton"); the compiled plan for
    float64 (which the kernels do not take) or where Triton is missing; eager on CPU, where compile
    time (tens of seconds a graph) rarely pays off, in chunks of 32 for head dims up to 64 (fewer
    FLOPs in the chunk products; measured faster at 1 x 512 x 4 x 64 and 2 x 2048 x 8 x 64, slower
    at head dim 128: docs/benchmarks.md, CPU)."""
    if device_type != "cuda":
        if head_dims is not None and max(head_dims) <= 64:
            return CPU_SMALL_HEADS
        return NAMED_PLANS["eager"]
    if dtype == torch.float64 or any(kernel_space(stage) is None for stage in STAGES):
        return NAMED_PLANS["compiled"]
    if dtype in (None, torch.bfloat16) and (head_dims is None or min(head_dims) >= 64):
        return NAMED_PLANS["fused"]
    return NAMED_PLANS["triton"]


def check_available(plan: Plan, device_type: str) -> None:
    """Raises NotImplementedError if a stage's backend is not registered, ValueError if it cannot run
    on this device type or its kernel configuration does not fit the registered kernel."""
    missing = [stage for stage in STAGES if getattr(plan, stage) == "triton" and kernel_space(stage) is None]
    if missing:
        raise NotImplementedError(
            f"the triton backend is not available for stages {missing}: no hand-written kernel is registered "
            f"for them in this build; use the compiled backend there (e.g. plan='compiled')"
        )
    wrong_device = [
        s for s, backend in plan.backends().items() if backend == "triton" and backend not in available_backends(s, device_type)
    ]
    if wrong_device and plan.fused:
        raise ValueError(f"the fused path's kernels run on {triton_device_types()} devices only, not on {device_type!r}")
    if wrong_device:
        raise ValueError(
            f"plan stages {wrong_device} use the triton backend, which runs on {triton_device_types()} devices only, "
            f"not on {device_type!r}"
        )
    for stage in STAGES:
        config = getattr(plan, f"{stage}_kernel")
        if config is not None:
            try:
                kernel_space(stage).check(config)
            except ValueError as e:
                raise ValueError(f"plan {stage}_kernel does not fit the registered kernel: {e}") from None


def resolve_plan(plan, chunk_size: int | None, device_type: str, auto=None, dtype=None,
                 head_dims: tuple[int, int] | None = None) -> Plan:
    """A Plan from delta_rule's `plan` and `chunk_size` arguments; an explicit chunk_size wins.

    `auto` is a callable returning the plan for "auto" (the plan cache's lookup for the caller's
    device, dtype and shape); None plans resolve to "auto" on CUDA and to the CPU default
    (`default_plan`, for the caller's head dims) elsewhere.
    """
    if plan is None:
        plan = "auto" if device_type == "cuda" else default_plan(device_type, dtype, head_dims)
    defaulted = plan == "auto"
    if isinstance(plan, str):
        if plan == "auto":
            plan = default_plan(device_type, dtype) if auto is None else auto()
        elif plan in NAMED_PLANS:
            plan = NAMED_PLANS[plan]
        else:
            raise ValueError(f"plan must be None, a Plan or one of {PLAN_NAMES}, got {plan!r}")
    elif not isinstance(plan, Plan):
        raise TypeError(f"plan must be None, a Plan or a plan name, got {type(plan).__name__}")
    if chunk_size is not None and check_chunk_size(chunk_size) != plan.chunk_size:
        if plan.fused and chunk_size not in FUSED_CHUNK_SIZES and defaulted:
            plan = NAMED_PLANS["triton"]  # the default for chunk sizes the fused path does not take
        plan = dataclasses.replace(plan, chunk_size=chunk_size)
    check_available(plan, device_type)
    return plan


__all__ = [
    "BACKENDS", "CHUNK_SIZES", "COMPILE_MODES", "FUSED_CHUNK_SIZES", "NAMED_PLANS", "PLAN_NAMES", "PRECISIONS", "STAGES", "STATE_SEGMENTS", "KernelConfig", "KernelSpace",
    "Plan", "available_backends", "check_available", "default_plan", "kernel_space", "register_triton_stage",
    "resolve_plan",
]
