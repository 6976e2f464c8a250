import pytest
import torch

from deltaflex import Plan
from deltaflex.testing import TOLERANCES
from deltaflex.tuning import check
from deltaflex.tuning.check import PlanRejected, check_plan


def test_a_correct_plan_passes():
    err = check_plan(Plan(chunk_size=32, compile=False), K=16, V=8, dtype=torch.float32, device="cpu")
    assert 0 < err < TOLERANCES[torch.float32]


def corrupting(transform):
    real = check.delta_rule

    def delta_rule(*args, **kwargs):
        o, s = real(*args, **kwargs)
        return transform(o), s

    return delta_rule


@pytest.mark.parametrize(
    "transform,worst",
    [
        (lambda o: o * 1.001, "o"),  # slightly off: 1e-3 > fp32's 1e-4
        (lambda o: torch.where(torch.arange(o.shape[1]).view(1, -1, 1, 1) == 299, float("nan"), o), "o"),  # one NaN row
        (lambda o: o + 0 * o.detach().sum(), None),  # the same values: passes
    ],
)
def test_wrong_plans_are_rejected(monkeypatch, transform, worst):
    monkeypatch.setattr(check, "delta_rule", corrupting(transform))
    plan = Plan(chunk_size=64, compile=False)
    if worst is None:
        check_plan(plan, K=16, V=16, dtype=torch.float32, device="cpu")
        return
    with pytest.raises(PlanRejected, match="off the float64 oracle") as info:
        check_plan(plan, K=16, V=16, dtype=torch.float32, device="cpu")
    assert not info.value.errors[worst] <= 1e-4 and info.value.plan == plan
