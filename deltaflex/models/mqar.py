"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"): data, a small model, training.

A sequence of `seq_len` tokens starts with `num_pairs` key-value pairs (keys drawn without
replacement from [1, V/2), values from [V/2, V)), then every key reappears once, as a query, at an
even offset of the rest of the sequence; the gaps follow Zoology's power law (`power_a`, small values
favour short gaps). The model must emit the key's value at the query position (labels: the value
there, -100 elsewhere, next-token style). Other positions hold 0 (Zoology's Figure 2, whose hardest
setting, sequence 512 with 64 pairs, is the default here) or random tokens (`random_fill`). Batches
are drawn on the fly from a seeded generator; the test set comes from its own seed, the same for
every model.

`train_mqar` trains a `CausalLM` (AdamW, linear warm-up then cosine decay, gradient clipping,
bf16 autocast on CUDA) with the loss and the accuracy on the query positions only: the head runs on
those `num_pairs` positions, not on all `seq_len` (with Zoology's vocabulary of 8192 the logits of
every position would dominate the cost).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..plan import Plan
from .config import LMConfig
from .lm import CausalLM

MQAR_MIXERS = ("deltanet", "linear", "linear-noconv", "attention")
# Each MQAR mixer as the LM builds it: its LMConfig mixer and extra LMConfig fields.
# "linear-noconv" is the ablation: linear attention without its short convolution.
_LM_MIXERS = {
    "deltanet": ("deltanet", {}),
    "linear": ("linear", {}),
    "linear-noconv": ("linear", {"linear": {"use_short_conv": False}}),
    "attention": ("attention", {}),
}
# One learning rate per mixer, the same for every width; a second call with --lr 1e-3 makes Zoology's
# max over learning rates (docs/results.md). The ablation takes linear attention's, so that the
# convolution is the only difference.
DEFAULT_LRS = {"deltanet": 3e-3, "linear": 3e-3, "linear-noconv": 3e-3, "attention": 3e-3}
IGNORE = -100  # the label of positions that are not queries (cross_entropy's ignore_index)
TEST_SEED_OFFSET = 1_000_003  # the test set's seed is the training seed plus this


@dataclasses.dataclass(frozen=True)
class MQARTask:
    vocab_size: int = 8192
    seq_len: int = 512
    num_pairs: int = 64
    power_a: float = 0.01
    random_fill: bool = False  # Zoology's Figure 2 (the hard setting): zeros between the queries

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "num_pairs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len < min_seq_len(self.num_pairs):
            raise ValueError(
                f"seq_len = {self.seq_len} must be at least 4 * num_pairs = {min_seq_len(self.num_pairs)} "
                "(the pairs, then a query slot of two tokens per key)"
            )
        if self.vocab_size < min_vocab_size(self.num_pairs):
            raise ValueError(f"vocab_size = {self.vocab_size} leaves fewer than num_pairs = {self.num_pairs} keys")
        if not 0 < self.power_a <= 1:
            raise ValueError(f"power_a must be in (0, 1], got {self.power_a!r}")

    @property
    def query_slots(self) -> int:
        return (self.seq_len - 2 * self.num_pairs) // 2


def min_seq_len(num_pairs: int) -> int:
    """The shortest sequence that holds the pairs and a query slot (two tokens) per key."""
    return 4 * num_pairs


def min_vocab_size(num_pairs: int) -> int:
    """The smallest vocabulary whose lower half, token 0 aside, holds num_pairs distinct keys."""
    return 2 * (num_pairs + 1)


class MQARBatch(NamedTuple):
    inputs: torch.Tensor  # [B, T] token ids
    labels: torch.Tensor  # [B, T]: the value at query positions, IGNORE elsewhere
    query_positions: torch.Tensor  # [B, N]: where the queries are (labels' non-IGNORE positions, sorted)
    answers: torch.Tensor  # [B, N]: labels at query_positions


def mqar_batch(task: MQARTask, batch_size: int, generator: torch.Generator) -> MQARBatch:
    """A batch of MQAR sequences on the generator's device (no host syncs: GPU-friendly)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = generator.device
    B, T, N, V = batch_size, task.seq_len, task.num_pairs, task.vocab_size
    half = V // 2

    def distinct(n_choices: int, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
        w = torch.ones(n_choices, device=device) if weights is None else weights
        return torch.multinomial(w.expand(B, n_choices), n, replacement=False, generator=generator)

    keys = distinct(half - 1, N) + 1  # [1, V/2)
    values = distinct(V - half, N) + half  # [V/2, V)
    slot = torch.arange(1, task.query_slots + 1, device=device, dtype=torch.float64)
    gap_weights = (task.power_a * slot ** (task.power_a - 1)).float()  # Zoology's power law over query slots
    gaps = distinct(task.query_slots, N, gap_weights)  # [B, N]: query i goes to slot gaps[:, i]
    if task.random_fill:
        inputs = torch.randint(0, V, (B, T), device=device, generator=generator)
    else:
        inputs = torch.zeros(B, T, dtype=torch.long, device=device)
    inputs[:, 0 : 2 * N : 2], inputs[:, 1 : 2 * N : 2] = keys, values
    positions = 2 * N + 2 * gaps
    inputs.scatter_(1, positions, keys)
    labels = torch.full((B, T), IGNORE, dtype=torch.long, device=device).scatter_(1, positions, values)
    order = positions.argsort(dim=1)
    positions = positions.gather(1, order)
    return MQARBatch(inputs, labels, positions, labels.gather(1, positions))


def mqar_test_set(task: MQARTask, num_examples: int, seed: int, device="cpu", batch_size: int = 256) -> list[MQARBatch]:
    """The held-out set: `num_examples` sequences from seed + TEST_SEED_OFFSET, in batches."""
    generator = torch.Generator(device=device).manual_seed(seed + TEST_SEED_OFFSET)
    sizes = [min(batch_size, num_examples - i) for i in range(0, num_examples, batch_size)]
    return [mqar_batch(task, n, generator) for n in sizes]


def mqar_model(
    task: MQARTask, mixer: str, width: int, num_layers: int = 2, num_heads: int = 2, plan: str | Plan | None = None
) -> CausalLM:
    """A small LM of `num_layers` layers of one mixer (one of MQAR_MIXERS)."""
    if mixer not in MQAR_MIXERS:
        raise ValueError(f"mixer must be one of {MQAR_MIXERS}, got {mixer!r}")
    lm_mixer, fields = _LM_MIXERS[mixer]
    config = LMConfig(vocab_size=task.vocab_size, hidden_size=width, mixers=(lm_mixer,) * num_layers,
                      num_heads=num_heads, **fields)
    return CausalLM(config, plan=plan)


def query_logits(model: CausalLM, batch: MQARBatch) -> torch.Tensor:
    """Logits at the query positions only, [B, N, vocab_size]."""
    hidden, _ = model.hidden_states(batch.inputs)
    index = batch.query_positions[..., None].expand(-1, -1, hidden.shape[-1])
    return model.head(hidden.gather(1, index)).float()


@torch.no_grad()
def evaluate(model: CausalLM, batches: list[MQARBatch], autocast: bool = False) -> float:
    """The fraction of query positions where the most likely token is the right value."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in batches:
        with _autocast(batch.inputs.device, autocast):
            predicted = query_logits(model, batch).argmax(dim=-1)
        correct += (predicted == batch.answers).sum().item()
        total += batch.answers.numel()
    model.train(was_training)
    return correct / total


# How far the test accuracy may still move over a run's last fifth of steps for the run to count as
# settled: a result that moved more is a snapshot of a model still learning (or unlearning).
SETTLED_WITHIN = 0.02


def still_moving(curve: list[dict], steps: int) -> float | None:
    """The change of the learning curve's accuracy over the last fifth of `steps` (the last point
    against the last one at or before 80% of them), where it exceeds SETTLED_WITHIN; else None (also
    where the curve has no point that early)."""
    if not curve:
        return None
    earlier = [p for p in curve if p["step"] <= 0.8 * steps]
    if not earlier or earlier[-1] is curve[-1]:
        return None
    change = curve[-1]["accuracy"] - earlier[-1]["accuracy"]
    return change if abs(change) > SETTLED_WITHIN else None


@dataclasses.dataclass(frozen=True)
class MQARTraining:
    # 5000: on the H200 (sequence 512, 64 pairs, width 128, lr 3e-3) softmax attention had not begun to
    # learn the task at 1200 steps (test accuracy 0.0007) and every mixer was at 0.999 or more at 5000
    steps: int = 5000
    batch_size: int = 128  # Zoology's at sequence 512
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200  # steps between learning-curve points
    curve_examples: int = 256  # test examples behind each learning-curve point
    test_examples: int = 1000  # the final accuracy's test examples
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "curve_examples", "test_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")


def train_mqar(
    task: MQARTask,
    mixer: str,
    width: int,
    training: MQARTraining,
    device: str | torch.device = "cpu",
    num_layers: int = 2,
    num_heads: int = 2,
    plan: str | Plan | None = None,
    compile: bool = False,
    deadline: float | None = None,
    on_step: Callable[[int, dict | None], None] | None = None,
) -> dict:
    """Trains one model for `training.steps` steps and returns its result (JSON-ready).

    deadline: a time.monotonic() value; training stops there and the result says complete = False.
    on_step(step, point): called after every step; `point` is the new learning-curve point
        ({"step", "loss", "accuracy"}) after an evaluation, else None.
    """
    device = torch.device(device)
    torch.manual_seed(training.seed)  # the initial weights
    model = mqar_model(task, mixer, width, num_layers, num_heads, plan).to(device)
    forward = torch.compile(query_logits) if compile else query_logits
    optimizer = _optimizer(model, training)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(training))
    generator = torch.Generator(device=device).manual_seed(training.seed)
    test_set = mqar_test_set(task, training.test_examples, training.seed, device)
    curve_set = test_set[: -(-training.curve_examples // 256)]
    autocast = device.type == "cuda"

    curve, loss_sum, step, started = [], torch.zeros((), device=device), 0, time.monotonic()
    while step < training.steps and (deadline is None or time.monotonic() < deadline):
        batch = mqar_batch(task, training.batch_size, generator)
        with _autocast(device, autocast):
            loss = F.cross_entropy(forward(model, batch).flatten(0, 1), batch.answers.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip)
        optimizer.step()
        schedule.step()
        loss_sum += loss.detach()
        step += 1
        point = None
        if step % training.eval_every == 0 or step == training.steps:
            since = step - (curve[-1]["step"] if curve else 0)
            point = {"step": step, "loss": loss_sum.item() / since, "accuracy": evaluate(model, curve_set, autocast)}
            curve.append(point)
            loss_sum.zero_()
        if on_step is not None:
            on_step(step, point)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.monotonic() - started  # learning-curve evaluations included
    return {
        "mixer": mixer,
        "width": width,
        "lr": training.lr,
        "num_pairs": task.num_pairs,
        "seq_len": task.seq_len,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "params": model.num_parameters(),
        "plan": plan if plan is None or isinstance(plan, str) else plan.to_dict(),
        "compile": compile,
        "steps": training.steps,
        "steps_done": step,
        "complete": step == training.steps,
        "accuracy": evaluate(model, test_set, autocast),
        "curve": curve,
        "still_moving": still_moving(curve, training.steps) if step == training.steps else None,
        "train_seconds": seconds,
        "tokens_per_second": step * training.batch_size * task.seq_len / max(seconds, 1e-9),
        "device": str(device),
    }


def _optimizer(model, training: MQARTraining) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (and embeddings) only, not on norm weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": training.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=training.lr, betas=(0.9, 0.98), fused=fused)


def _warmup_cosine(training: MQARTraining):
    warmup = max(1, int(training.warmup_fraction * training.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, training.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
