import itertools

import optuna
import pytest

from deltaflex import plan as plan_module
from deltaflex.plan import CHUNK_SIZES, KernelConfig, KernelSpace, Plan, default_plan, register_triton_stage
from deltaflex.tuning.space import FUSED_STATE_SEGMENTS, SearchSpace


def all_plans(space: SearchSpace) -> set[Plan]:
    """Every plan the space holds, by sampling it exhaustively with optuna's grid of fixed trials."""
    names = ["chunk_size", "compile", "compile_mode", "fused", "fused.chunk_size", "fused.state_segment"]
    choices = [space.chunk_sizes, space.compile, space.compile_modes, (False, True), (16, 32, 64), FUSED_STATE_SEGMENTS]
    for stage, backends in space.backends:
        names.append(stage), choices.append(backends)
    for name, options in space.compiled_options:
        names.append(name), choices.append(options)
    for stage, kernel in space.kernels:
        for block, sizes in kernel.blocks:
            names.append(f"{stage}.{block}"), choices.append(sizes)
        names += [f"{stage}.num_warps", f"{stage}.num_stages"]
        choices += [kernel.num_warps, kernel.num_stages]
    return {space.suggest(optuna.trial.FixedTrial(dict(zip(names, values)))) for values in itertools.product(*choices)}


@pytest.fixture
def no_kernels(monkeypatch):
    import deltaflex.kernels  # noqa: F401  (imported first, so nothing refills the emptied registry)

    monkeypatch.setattr(plan_module, "_TRITON_STAGES", {})


def test_cpu_space_is_eager_chunk_sizes_by_default():
    space = SearchSpace.for_device("cpu")
    assert all_plans(space) == {Plan(chunk_size=c, compile=False) for c in CHUNK_SIZES}
    assert space.size() == 4
    assert all_plans(SearchSpace.for_device("cpu", compile=True)) == all_plans(space) | {Plan(chunk_size=c) for c in CHUNK_SIZES}


def test_cuda_space_searches_compiled_and_eager_plans_with_available_backends(no_kernels):
    space = SearchSpace.for_device("cuda")
    plans = all_plans(space)
    # per chunk size: eager, or compiled with state_group 1/4/8 and with or without CUDA graphs
    assert len(plans) == space.size() == 4 * (1 + 3 * 2)
    assert all(set(p.backends().values()) == {"compiled"} for p in plans)
    assert default_plan("cuda") in plans
    assert {Plan(chunk_size=c, state_group=8, cuda_graph=True) for c in CHUNK_SIZES} <= plans
    assert SearchSpace.for_device("cuda", compile=False).size() == 4
    with_max_autotune = all_plans(SearchSpace.for_device("cuda", max_autotune=True))
    assert {p.compile_mode for p in with_max_autotune - plans} == {"max-autotune-no-cudagraphs"}
    assert len(with_max_autotune - plans) == 4 * 3 * 2


@pytest.fixture
def registered_state_kernel(no_kernels):
    register_triton_stage("state", KernelSpace({"BV": (32, 64)}, num_warps=(4, 8), num_stages=(2,), default=KernelConfig({"BV": 64})))


def test_space_grows_with_registered_kernels(registered_state_kernel):
    space = SearchSpace.for_device("cuda", compile=False)
    plans = all_plans(space)
    assert len(plans) == space.size() == 4 * (1 + 2 * 2)  # compiled state, or triton x BV x num_warps
    assert Plan(chunk_size=16, compile=False, state="triton", state_kernel=KernelConfig({"BV": 32}, num_warps=8)) in plans
    assert SearchSpace.for_device("cpu").size() == 4  # hand-written kernels run on CUDA only


def test_params_reproduce_a_plan(registered_state_kernel):
    space = SearchSpace.for_device("cuda", max_autotune=True)
    for plan in all_plans(space):
        assert space.suggest(optuna.trial.FixedTrial(space.params(plan))) == plan
    # a hand-written stage left at the kernel's default configuration is inside the space too
    assert space.params(Plan(state="triton")) == {
        "chunk_size": 64, "state": "triton", "state.BV": 64, "state.num_warps": 4, "compile": True, "compile_mode": "default",
        "state_group": 1, "cuda_graph": False}
    assert space.params(Plan(state="triton", state_kernel=KernelConfig({"BV": 128}))) is None  # outside
    assert SearchSpace.for_device("cpu").params(Plan()) is None  # compiled plans are outside the default CPU space


def test_cuda_space_has_every_registered_kernel():
    space = SearchSpace.for_device("cuda")
    assert dict(space.backends) == {s: ("compiled", "triton") for s in ("solve", "wy", "state", "output")}
    assert dict(space.kernels)["state"] == plan_module.kernel_space("state")
    # the interpreter's kernels (tests on CPU) are never tuned
    assert all(choices == ("compiled",) for _, choices in SearchSpace.for_device("cpu").backends)


def test_the_fused_path_is_searched_where_every_stage_has_a_kernel(no_kernels):
    for stage in ("solve", "wy", "state", "output"):
        register_triton_stage(stage, KernelSpace(num_warps=(4, 8), num_stages=(2,), default=KernelConfig()))
    space = SearchSpace.for_device("cuda", compile=False)
    plans = all_plans(space)
    # per chunk size: (compiled or 2 launch configs) per stage = 3^4; plus the fused path at chunk sizes 16-64,
    # each with its forward's state pass automatic, one-level or in segments of 16 to 128 chunks
    assert len(plans) == space.size() == 4 * 3**4 + 3 * 6
    fused = [p for p in plans if p.fused]
    assert sorted({p.chunk_size for p in fused}) == [16, 32, 64]
    assert {p.state_segment for p in fused} == set(FUSED_STATE_SEGMENTS) == {0, 1, 16, 32, 64, 128}
    assert all(set(p.backends().values()) == {"triton"} and not p.compile for p in fused)
    assert all(space.params(p) is not None for p in fused)


def test_fused_plans_come_in_the_order_the_tuner_tries_them(no_kernels):
    assert SearchSpace.for_device("cuda", compile=False).fused_plans(default_plan("cuda")) == []  # no kernels
    for stage in ("solve", "wy", "state", "output"):
        register_triton_stage(stage, KernelSpace(num_warps=(4, 8), num_stages=(2,), default=KernelConfig()))
    space = SearchSpace.for_device("cuda", compile=False)
    plans = space.fused_plans(Plan(chunk_size=32, compile=False, fused=True, **dict.fromkeys(("solve", "wy", "state", "output"), "triton")))
    assert [(p.chunk_size, p.state_segment) for p in plans] == [(c, g) for c in (32, 64, 16) for g in FUSED_STATE_SEGMENTS]
    assert set(plans) == {p for p in all_plans(space) if p.fused}  # the space's fused plans, each once
