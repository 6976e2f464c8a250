"""TrainConfig: validation naming the field, batch splits over ranks, JSON round trip; the schedule."""

import math

import pytest

from deltaflex.train import TrainConfig, warmup_cosine


def test_json_round_trip():
    config = TrainConfig(steps=7, batch_size=6, seq_len=16, micro_batch_size=1, betas=(0.8, 0.9), bf16=False)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["betas"] == [0.8, 0.9]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"batch_size": 2.0}, "batch_size must be an integer"),
        ({"lr": 0}, "lr must be a positive number"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio must be in"),
        ({"betas": (0.9,)}, "betas must be two numbers"),
        ({"grad_clip": -1}, "grad_clip must be a number >= 0"),
        ({"plan": "fast"}, "plan must be None or one of"),
    ],
)
def test_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


def test_unknown_field():
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"stepz": 3})


def test_batch_splits_over_ranks():
    assert TrainConfig(batch_size=8).micro_batches(2) == (4, 4)
    assert TrainConfig(batch_size=8, micro_batch_size=2).micro_batches(2) == (4, 2)
    with pytest.raises(ValueError, match="batch_size = 6 must be a multiple of the world size 4"):
        TrainConfig(batch_size=6).micro_batches(4)
    with pytest.raises(ValueError, match="micro_batch_size = 3 must divide the 4 sequences"):
        TrainConfig(batch_size=8, micro_batch_size=3).micro_batches(2)


def test_warmup_then_cosine_to_the_floor():
    f = warmup_cosine(TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1))
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert warmup_cosine(TrainConfig(steps=5, warmup_steps=0))(0) == pytest.approx(1.0)
