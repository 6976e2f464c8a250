import dataclasses
import json

import pytest
import torch

from deltaflex import Plan, delta_rule, plan as plan_module
from deltaflex.plan import (
    NAMED_PLANS, STAGES, KernelConfig, KernelSpace, available_backends, check_available, default_plan,
    register_triton_stage, resolve_plan,
)
from deltaflex.testing import make_inputs


@pytest.fixture
def no_kernels(monkeypatch):
    """A build where no hand-written kernel has registered (deltaflex.kernels already imported, so
    nothing refills the emptied registry), whose kernels would run on CUDA only."""
    import deltaflex.kernels  # noqa: F401

    monkeypatch.setattr(plan_module, "_TRITON_STAGES", {})
    monkeypatch.setattr(plan_module, "triton_device_types", lambda: ("cuda",))


@pytest.fixture
def fake_state_kernel(no_kernels):
    """A registered hand-written state pass (registry only: nothing here runs it)."""
    space = KernelSpace({"BK": (32, 64), "BV": (32, 64)}, num_warps=(4, 8), num_stages=(2, 3),
                        default=KernelConfig({"BK": 64, "BV": 64}))
    register_triton_stage("state", space)
    return space


def test_named_plans_and_defaults():
    assert resolve_plan(None, None, "cpu") == NAMED_PLANS["eager"] == Plan(compile=False) == default_plan("cpu")
    # None on CUDA is "auto": the tuned plan, else the default (delta_rule passes the cache lookup in)
    # on CUDA the fused path where checked on the H200 (bf16, head dims >= 64), else the stage kernels;
    # the compiled plan for float64
    assert resolve_plan(None, None, "cuda") == NAMED_PLANS["fused"] == default_plan("cuda", torch.bfloat16, (64, 128))
    for dtype, dims in ((torch.float32, (64, 64)), (torch.float16, (128, 128)), (torch.bfloat16, (32, 64))):
        assert default_plan("cuda", dtype, dims) == NAMED_PLANS["triton"]
    assert resolve_plan(None, None, "cuda", dtype=torch.float64) == NAMED_PLANS["compiled"] == Plan()
    assert resolve_plan(None, None, "cuda", auto=lambda: Plan(chunk_size=128)) == Plan(chunk_size=128)
    assert resolve_plan("auto", None, "cpu", auto=lambda: Plan(chunk_size=16)) == Plan(chunk_size=16)
    assert resolve_plan("compiled", 32, "cpu") == Plan(chunk_size=32)
    assert resolve_plan(Plan(chunk_size=16), None, "cpu").chunk_size == 16
    assert NAMED_PLANS["mixed-state"] == Plan(state="triton")
    assert NAMED_PLANS["triton"].backends() == dict.fromkeys(("solve", "wy", "state", "output"), "triton")


def test_plans_are_frozen_and_hashable():
    plan = Plan(chunk_size=128, compile=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.chunk_size = 16
    assert {plan: 1}[Plan(chunk_size=128, compile=False)] == 1
    config = KernelConfig({"BV": 32, "BK": 64}, num_warps=8)
    assert config == KernelConfig((("BK", 64), ("BV", 32)), num_warps=8) and hash(config)
    assert {Plan(state="triton", state_kernel=config): 1}


@pytest.mark.parametrize(
    "plan",
    [
        Plan(),
        Plan(chunk_size=16, compile=False),
        Plan(chunk_size=128, compile_mode="max-autotune-no-cudagraphs"),
        Plan(state="triton", state_kernel=KernelConfig({"BK": 64, "BV": 32}, num_warps=8, num_stages=3)),
        Plan(solve="triton", wy="triton", output="triton", state="triton", output_kernel=KernelConfig(num_warps=2)),
    ],
    ids=lambda p: p.describe(),
)
def test_json_round_trip(plan):
    text = plan.to_json()
    assert json.loads(text)["chunk_size"] == plan.chunk_size
    back = Plan.from_json(text)
    assert back == plan and hash(back) == hash(plan) and back.to_json() == text
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(chunk_size=48), ValueError, "chunk_size"),
        (dict(chunk_size="64"), ValueError, "chunk_size"),
        (dict(state="cuda"), ValueError, "stage 'state'"),
        (dict(compile="yes"), TypeError, "compile must be True or False"),
        (dict(compile_mode="turbo"), ValueError, "compile_mode must be one of"),
        (dict(compile=False, compile_mode="max-autotune-no-cudagraphs"), ValueError, "needs compile=True"),
        (dict(state_kernel=KernelConfig()), ValueError, "state_kernel configures a hand-written kernel"),
        (dict(state="triton", state_kernel=(4, 2)), TypeError, "state_kernel must be a KernelConfig"),
        (dict(state="triton", state_kernel={"num_warps": 3}), ValueError, "num_warps must be one of"),
    ],
)
def test_invalid_plans(kwargs, error, match):
    with pytest.raises(error, match=match):
        Plan(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(blocks={"BK": 48}), "block 'BK' must be one of"),
        (dict(blocks={"B K": 64}), "identifiers"),
        (dict(blocks=[("BK", 64), ("BK", 32)]), "unique"),
        (dict(num_warps=0), "num_warps"),
        (dict(num_stages=9), "num_stages"),
        (dict(num_stages=True), "num_stages"),
    ],
)
def test_invalid_kernel_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KernelConfig(**kwargs)


@pytest.mark.parametrize(
    "text,error,match",
    [
        ("{not json", ValueError, "JSON object"),
        ("[64]", TypeError, "JSON object"),
        ('{"chunk_size": 64, "turbo": true}', ValueError, r"unknown Plan fields \['turbo'\]"),
        ('{"chunk_size": 64, "state": "triton", "state_kernel": {"warps": 4}}', ValueError, "unknown KernelConfig fields"),
        ('{"chunk_size": 100}', ValueError, "chunk_size"),
    ],
)
def test_invalid_plan_json(text, error, match):
    with pytest.raises(error, match=match):
        Plan.from_json(text)


def test_resolve_rejects_bad_plans():
    with pytest.raises(ValueError, match="plan must be None, a Plan or one of"):
        resolve_plan("fastest", None, "cpu")
    with pytest.raises(TypeError, match="plan must be None, a Plan or a plan name"):
        resolve_plan({"chunk_size": 64}, None, "cpu")
    with pytest.raises(ValueError, match="chunk_size"):
        resolve_plan("eager", 100, "cpu")


def test_every_stage_has_a_registered_kernel():
    from deltaflex.kernels.common import INTERPRETED

    for stage in ("solve", "wy", "state", "output"):
        assert available_backends(stage, "cuda") == ("compiled", "triton")
        assert available_backends(stage, "cpu") == (("compiled", "triton") if INTERPRETED else ("compiled",))
        assert NAMED_PLANS["triton"].kernel(stage) == plan_module.kernel_space(stage).default
    check_available(NAMED_PLANS["triton"], "cuda")


def test_triton_stages_are_refused_until_they_exist(no_kernels):
    assert available_backends("state", "cuda") == ("compiled",)
    x = make_inputs(1, 8, 1, 4, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="triton backend is not available for stages \\['state'\\]"):
        delta_rule(**x, plan=Plan(state="triton"))
    for name in ("triton", "mixed-solve"):
        with pytest.raises(NotImplementedError, match="triton"):
            delta_rule(**x, plan=name)


def test_the_fused_plan_says_it_needs_cuda():
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="the fused path's kernels run on .* devices only, not on 'mps'"):
        check_available(NAMED_PLANS["fused"], "mps")  # (the CPU runs them under TRITON_INTERPRET)


def test_registered_kernels_become_available_on_cuda_only(fake_state_kernel):
    assert available_backends("state", "cuda") == ("compiled", "triton")
    assert available_backends("state", "cpu") == ("compiled",)
    assert available_backends("solve", "cuda") == ("compiled",)
    check_available(NAMED_PLANS["mixed-state"], "cuda")
    assert NAMED_PLANS["mixed-state"].kernel("state") == fake_state_kernel.default  # the kernel's default
    with pytest.raises(ValueError, match="runs on \\('cuda',\\) devices only"):
        check_available(NAMED_PLANS["mixed-state"], "cpu")
    with pytest.raises(NotImplementedError, match="'solve'"):
        check_available(NAMED_PLANS["mixed-solve"], "cuda")
    with pytest.raises(ValueError, match="does not fit the registered kernel"):
        check_available(Plan(state="triton", state_kernel=KernelConfig({"BT": 64})), "cuda")
    with pytest.raises(ValueError, match="stage must be one of"):
        register_triton_stage("attention", fake_state_kernel)
    with pytest.raises(TypeError, match="KernelSpace"):
        register_triton_stage("state", {"BK": (64,)})


def test_describe():
    assert Plan().describe() == "C64 compiled"
    assert Plan(chunk_size=32, compile=False).describe() == "C32 eager"
    assert Plan(compile_mode="max-autotune-no-cudagraphs").describe() == "C64 compiled(max-autotune-no-cudagraphs)"
    plan = Plan(chunk_size=128, state="triton", state_kernel=KernelConfig({"BK": 64}, num_warps=8, num_stages=3))
    assert plan.describe() == "C128 compiled, triton state[BK=64 w8 s3]"
    assert NAMED_PLANS["mixed-solve"].describe() == "C64 compiled, triton solve"
    assert NAMED_PLANS["triton"].describe() == "C64 triton stages"
    assert NAMED_PLANS["fused"].describe() == "C64 fused"
    tuned = Plan(**{s: "triton" for s in STAGES}, compile=False, precision="bf16", wy_kernel=KernelConfig({"BK": 32}))
    assert tuned.describe() == "C64 triton stages, precision=bf16, wy[BK=32 w4 s2]"


def test_triton_stages_refuse_float64_clearly():
    # the Triton kernels take bf16/fp16/fp32 inputs; float64 is the compiled backend's (on a device
    # where the kernels run: CUDA, or the CPU under the tests' Triton interpreter)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = make_inputs(1, 8, 1, 4, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="float64.*compiled backend"):
        delta_rule(**x, plan=Plan(state="triton", compile=False))


def test_plan_specs():
    from deltaflex.plan import plan_from_spec

    assert plan_from_spec("compiled") == Plan()
    assert plan_from_spec("state_group=8,cuda_graph=1") == Plan(state_group=8, cuda_graph=True)
    assert plan_from_spec("triton,precision=bf16") == dataclasses.replace(NAMED_PLANS["triton"], precision="bf16")
    assert plan_from_spec("eager,chunk_size=128") == Plan(chunk_size=128, compile=False)
    for spec, match in [("fastest", "starts with one of"), ("turbo=1", "field=value"), ("chunk_size", "field=value"),
                        ("chunk_size=big", "takes int values"), ("chunk_size=100", "chunk_size")]:
        with pytest.raises(ValueError, match=match):
            plan_from_spec(spec)


def test_auto_precision():
    assert Plan().precision_for("cuda") == Plan().precision_for("cpu") == "fp32"
    assert NAMED_PLANS["triton"].precision_for("cuda") == "bf16x3"  # measured: as accurate, twice as fast
    assert NAMED_PLANS["triton"].precision_for("cpu") == "fp32"
    assert NAMED_PLANS["mixed-state"].precision_for("cuda") == "fp32"
    assert dataclasses.replace(NAMED_PLANS["triton"], precision="bf16").precision_for("cuda") == "bf16"


def test_cpu_default_takes_chunks_of_32_for_small_heads():
    assert default_plan("cpu", torch.float32, (64, 64)) == Plan(chunk_size=32, compile=False)
    assert default_plan("cpu", torch.float32, (64, 128)) == default_plan("cpu") == NAMED_PLANS["eager"]
    assert resolve_plan(None, None, "cpu", head_dims=(16, 32)).chunk_size == 32
    assert resolve_plan(None, 16, "cpu", head_dims=(16, 32)).chunk_size == 16  # an explicit chunk size wins
