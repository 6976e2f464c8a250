"""MQAR: every answer is recoverable from its sequence (decoded here by plain lookup), the layout
follows Zoology's, batches are seeded; training runs, records its curve and honours a deadline."""

import time

import pytest
import torch

from deltaflex.models.mqar import (
    IGNORE,
    SETTLED_WITHIN,
    MQARTask,
    MQARTraining,
    evaluate,
    mqar_batch,
    mqar_model,
    mqar_test_set,
    query_logits,
    still_moving,
    train_mqar,
)

TINY = MQARTask(vocab_size=64, seq_len=40, num_pairs=6)


def decode_by_lookup(inputs, labels, num_pairs):
    """Answers the way a perfect recall model would: find the query's key among the pairs at the
    start and read the token after it. Returns (predicted, expected) values at every query."""
    predicted, expected = [], []
    for row, row_labels in zip(inputs.tolist(), labels.tolist()):
        pairs = row[: 2 * num_pairs]
        table = dict(zip(pairs[0::2], pairs[1::2]))
        for t, label in enumerate(row_labels):
            if label != IGNORE:
                predicted.append(table.get(row[t]))
                expected.append(label)
    return predicted, expected


@pytest.mark.parametrize("task", [TINY, MQARTask(), MQARTask(vocab_size=100, seq_len=33, num_pairs=8, random_fill=True)])
def test_answers_are_recoverable_from_the_context(task):
    batch = mqar_batch(task, 16, torch.Generator().manual_seed(3))
    predicted, expected = decode_by_lookup(batch.inputs, batch.labels, task.num_pairs)
    assert len(expected) == 16 * task.num_pairs  # every key is queried once
    assert predicted == expected


def test_layout_follows_zoology():
    task = MQARTask(vocab_size=64, seq_len=48, num_pairs=5, random_fill=False)
    batch = mqar_batch(task, 32, torch.Generator().manual_seed(0))
    N, half = task.num_pairs, task.vocab_size // 2
    keys, values = batch.inputs[:, 0 : 2 * N : 2], batch.inputs[:, 1 : 2 * N : 2]
    assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < 64)).all()
    assert all(len(set(r)) == N for r in keys.tolist()) and all(len(set(r)) == N for r in values.tolist())
    q = batch.query_positions
    assert (q >= 2 * N).all() and (q % 2 == 0).all() and (q.diff(dim=1) > 0).all()
    assert torch.equal(batch.labels.gather(1, q), batch.answers)
    assert ((batch.labels != IGNORE).sum(1) == N).all()
    assert sorted(batch.inputs.gather(1, q)[0].tolist()) == sorted(keys[0].tolist())  # each key queried once
    query_region = batch.inputs[:, 2 * N :].clone()
    query_region.scatter_(1, q - 2 * N, 0)
    assert (query_region == 0).all()  # no random fill: zeros between the queries


def test_short_gaps_are_likelier():
    """Zoology's power law (a = 0.01): most queries sit near the start of the query region."""
    task = MQARTask(vocab_size=512, seq_len=512, num_pairs=16, random_fill=False)
    batch = mqar_batch(task, 64, torch.Generator().manual_seed(0))
    slots = (batch.query_positions - 2 * task.num_pairs) // 2
    assert (slots < task.query_slots // 4).float().mean() > 0.4


def test_batches_follow_the_seed():
    a = mqar_batch(TINY, 4, torch.Generator().manual_seed(5))
    b = mqar_batch(TINY, 4, torch.Generator().manual_seed(5))
    c = mqar_batch(TINY, 4, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.inputs, c.inputs)
    test = mqar_test_set(TINY, 10, seed=5, batch_size=4)
    assert [len(t.inputs) for t in test] == [4, 4, 2]
    assert not torch.equal(test[0].inputs, a.inputs)  # the test set has its own seed


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"seq_len": 20, "num_pairs": 6}, "seq_len = 20 must be at least 4 \\* num_pairs = 24"),
        ({"vocab_size": 12, "num_pairs": 6}, "vocab_size = 12 leaves fewer than num_pairs = 6 keys"),
        ({"num_pairs": 0}, "num_pairs must be a positive integer"),
        ({"power_a": 0.0}, "power_a must be in"),
    ],
)
def test_bad_task(fields, message):
    with pytest.raises(ValueError, match=message):
        MQARTask(**{"vocab_size": 64, "seq_len": 40, "num_pairs": 6, **fields})


def test_bad_model_and_training_arguments():
    with pytest.raises(ValueError, match="mixer must be one of"):
        mqar_model(TINY, "mamba", 32)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        mqar_batch(TINY, 0, torch.Generator())
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        MQARTraining(steps=0)
    with pytest.raises(ValueError, match="lr must be positive"):
        MQARTraining(lr=0.0)
    with pytest.raises(ValueError, match="warmup_fraction must be in"):
        MQARTraining(warmup_fraction=1.0)


def test_query_logits_are_the_full_logits_at_the_queries():
    model = mqar_model(TINY, "deltanet", 32).double()
    batch = mqar_batch(TINY, 3, torch.Generator().manual_seed(0))
    full = model(batch.inputs)[0]
    picked = full.gather(1, batch.query_positions[..., None].expand(-1, -1, TINY.vocab_size))
    assert torch.allclose(query_logits(model, batch), picked, rtol=0, atol=1e-12)


def test_evaluate_counts_right_answers():
    model = mqar_model(TINY, "attention", 32)
    batches = mqar_test_set(TINY, 8, seed=0, batch_size=4)
    acc = evaluate(model, batches)
    with torch.no_grad():
        hits = sum((query_logits(model, b).argmax(-1) == b.answers).sum().item() for b in batches)
    assert acc == hits / (8 * TINY.num_pairs)
    assert model.training  # evaluate puts the model back in training mode


def test_the_ablation_is_linear_attention_without_its_convolution():
    with_conv, without = mqar_model(TINY, "linear", 32), mqar_model(TINY, "linear-noconv", 32)
    convs = [n for n, _ in with_conv.named_modules() if n.endswith("conv1d")]
    assert len(convs) == 6 and not [n for n, _ in without.named_modules() if n.endswith("conv1d")]
    assert {n for n, _ in without.named_parameters()} == {n for n, _ in with_conv.named_parameters()} - {
        f"{n}.weight" for n in convs}


@pytest.mark.parametrize("mixer", ["deltanet", "linear", "linear-noconv", "attention"])
def test_training_runs_and_learns(mixer):
    task = MQARTask(vocab_size=32, seq_len=24, num_pairs=4)
    training = MQARTraining(steps=20, batch_size=8, lr=1e-2, eval_every=10, curve_examples=16, test_examples=24)
    seen = []
    result = train_mqar(task, mixer, 16, training, on_step=lambda step, point: seen.append((step, point)))
    assert [s for s, _ in seen] == list(range(1, 21))
    assert [p["step"] for _, p in seen if p is not None] == [10, 20]
    assert result["complete"] and result["steps_done"] == 20 and result["mixer"] == mixer
    assert (result["num_pairs"], result["seq_len"]) == (4, 24)
    assert [p["step"] for p in result["curve"]] == [10, 20]
    assert result["curve"][1]["loss"] < result["curve"][0]["loss"] < 4.0  # log(32) = 3.5 at chance
    assert 0 <= result["accuracy"] <= 1 and result["tokens_per_second"] > 0 and result["params"] > 0


def test_training_is_seeded_and_stops_at_the_deadline():
    training = MQARTraining(steps=6, batch_size=8, eval_every=3, curve_examples=16, test_examples=16)
    a, b = (train_mqar(TINY, "linear", 16, training) for _ in range(2))
    assert a["curve"] == b["curve"] and a["accuracy"] == b["accuracy"]
    cut = train_mqar(TINY, "linear", 16, training, deadline=time.monotonic())
    assert not cut["complete"] and cut["steps_done"] == 0 and cut["curve"] == []


def test_still_moving_compares_the_last_fifth_of_the_steps():
    def curve(*points):
        return [{"step": s, "loss": 1.0, "accuracy": a} for s, a in points]

    rising = curve((200, 0.1), (800, 0.5), (1000, 0.9))  # 800 is the last point at or before 80%
    assert still_moving(rising, 1000) == pytest.approx(0.4)
    assert still_moving(curve((800, 0.97), (1000, 0.97 + SETTLED_WITHIN / 2)), 1000) is None  # settled
    assert still_moving(curve((800, 0.9), (1000, 0.5)), 1000) == pytest.approx(-0.4)  # unlearning moves too
    assert still_moving(curve((900, 0.1), (1000, 0.9)), 1000) is None  # no point that early: cannot tell
    assert still_moving([], 1000) is None


def test_a_run_cut_short_reports_no_movement():
    training = MQARTraining(steps=6, batch_size=8, eval_every=3, curve_examples=16, test_examples=16)
    assert train_mqar(TINY, "linear", 16, training, deadline=time.monotonic())["still_moving"] is None
    assert "still_moving" in train_mqar(TINY, "linear", 16, training)
