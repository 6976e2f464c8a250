import dataclasses

import pytest
import torch

from deltaflex import Plan, delta_rule
from deltaflex.plan import NAMED_PLANS, resolve_plan
from deltaflex.testing import make_inputs


def test_named_plans_and_defaults():
    assert resolve_plan(None, None, "cpu") == NAMED_PLANS["eager"] == Plan(compile=False)
    assert resolve_plan(None, None, "cuda") == NAMED_PLANS["compiled"] == Plan()
    assert resolve_plan("compiled", 32, "cpu") == Plan(chunk_size=32)
    assert resolve_plan(Plan(chunk_size=16), None, "cpu").chunk_size == 16


def test_plans_are_frozen_and_hashable():
    plan = Plan(chunk_size=128, compile=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.chunk_size = 16
    assert {plan: 1}[Plan(chunk_size=128, compile=False)] == 1


@pytest.mark.parametrize(
    "kwargs,error,match",
    [(dict(chunk_size=48), ValueError, "chunk_size"), (dict(state="cuda"), ValueError, "stage 'state'")],
)
def test_invalid_plans(kwargs, error, match):
    with pytest.raises(error, match=match):
        Plan(**kwargs)


def test_triton_stages_refuse_float64_clearly():
    # the Triton kernels take bf16/fp16/fp32 inputs; float64 is the compiled backend's
    x = make_inputs(1, 8, 1, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64.*compiled backend"):
        delta_rule(**x, plan=Plan(state="triton", compile=False))
