"""`train`: the training loop of a `CausalLM`, on one process or a rank of torchrun's.

A step: for each micro-batch of this rank's rows of the global batch, forward (bf16 autocast on
CUDA), cross-entropy over the labelled positions, backward (under FSDP the gradients are
reduce-scattered on the last micro-batch only); then global gradient-norm clipping, AdamW, the
warm-up + cosine schedule. Every `log_every` steps the ranks agree on the mean loss (and on stopping,
when the wall-clock budget is spent) and rank 0 appends a record to <out>/metrics.jsonl. A checkpoint
is written every `save_every` steps, at the end and when the budget stops the run; a run started on a
folder that holds one resumes from the newest.

Everything that can be wrong with the input (data, configs, the folder's earlier run, batch splits)
is checked before the first step, and before anything is written.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models import CausalLM, LMConfig
from ..models.mqar import IGNORE
from . import checkpoint
from .config import TrainConfig
from .data import MQARData, TokenFile, rank_batch
from .distributed import Runtime, all_sum, barrier, shard, start, stop

METRICS_FILE = "metrics.jsonl"


def warmup_cosine(config: TrainConfig) -> Callable[[int], float]:
    """The learning rate's factor at a step: linear warm-up to 1 over warmup_steps, then a cosine
    down to min_lr_ratio at the last step."""
    warmup, steps, floor = config.warmup_steps, config.steps, config.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def optimizer_for(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings only (not on norm weights and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=device.type == "cuda")


def check_data(data, model_config: LMConfig, config: TrainConfig) -> None:
    if not isinstance(data, (TokenFile, MQARData)):
        raise TypeError(f"data must be a TokenFile or MQARData, got {type(data).__name__}")
    if data.seq_len != config.seq_len:
        raise ValueError(f"the data's sequences are {data.seq_len} tokens, the training config's seq_len {config.seq_len}")
    vocab = data.task.vocab_size if isinstance(data, MQARData) else data.vocab_size
    if vocab is not None and vocab != model_config.vocab_size:
        raise ValueError(f"the data's vocabulary is {vocab} tokens, the model's vocab_size {model_config.vocab_size}")


def _check_folder(out: Path, record: dict) -> Path | None:
    """The checkpoint to resume from (None: a fresh start); ValueError when the folder holds another
    run, before anything is written."""
    run_file = out / checkpoint.RUN_FILE
    if run_file.is_file():
        checkpoint.check_compatible(json.loads(run_file.read_text()), record, run_file)
    elif (out / METRICS_FILE).exists() or (out / "checkpoints").exists():
        raise ValueError(f"{out} holds metrics or checkpoints but no {checkpoint.RUN_FILE}: not a folder of this "
                         "command's runs; choose another output folder")
    found = checkpoint.latest(out)
    if found is not None:
        checkpoint.check_compatible(checkpoint.read_meta(found), record, found / checkpoint.META_FILE)
    return found


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drops the records past the resumed step (a killed run's last steps are computed again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def train(
    model_config: LMConfig,
    config: TrainConfig,
    data: TokenFile | MQARData,
    out: str | Path,
    device: str | torch.device | None = None,
    max_minutes: float | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> dict:
    """Trains (or resumes training) to config.steps; returns a summary (JSON-ready).

    out: the run's folder (run.json, metrics.jsonl, checkpoints/).
    max_minutes: wall-clock budget; when spent, the run saves a checkpoint and stops (complete: False).
    on_log(record): called on rank 0 with every metrics record.
    """
    if not isinstance(model_config, LMConfig):
        raise TypeError(f"model_config must be an LMConfig, got {type(model_config).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"max_minutes must be positive, got {max_minutes!r}")
    check_data(data, model_config, config)
    out = Path(out)
    runtime = start(device)
    try:
        return _train(model_config, config, data, out, runtime, max_minutes, on_log)
    finally:
        stop(runtime)


def _train(model_config, config, data, out, runtime: Runtime, max_minutes, on_log) -> dict:
    local, micro = config.micro_batches(runtime.world_size)
    record = checkpoint.run_record(model_config, config, data)
    resume_from = _check_folder(out, record)
    barrier(runtime)  # every rank has read the folder before rank 0 writes to it

    torch.manual_seed(config.seed)  # every rank builds the same full model, then keeps its shards
    model = shard(CausalLM(model_config, plan=config.plan), runtime, config.compile)
    optimizer = optimizer_for(model, config, runtime.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config))
    step = 0 if resume_from is None else checkpoint.load(resume_from, model, optimizer, scheduler, runtime)

    metrics = out / METRICS_FILE
    if runtime.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / checkpoint.RUN_FILE).write_text(json.dumps(record, indent=1))
        _keep_metrics_until(metrics, step)
    start_step, device = step, runtime.device
    cuda = device.type == "cuda"
    autocast = cuda if config.bf16 is None else config.bf16
    fsdp = runtime.distributed
    params = list(model.parameters())
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    loss_sum = torch.zeros((), device=device)
    grad_norm = torch.zeros((), device=device)
    window_start, window_steps, stopped, saved = time.perf_counter(), 0, False, resume_from
    run_start = window_start
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    while step < config.steps and not stopped:
        inputs, labels = rank_batch(data, step, config.batch_size, runtime.rank, runtime.world_size)
        for i in range(0, local, micro):
            x, y = (t[i : i + micro].to(device, non_blocking=True) for t in (inputs, labels))
            if fsdp:
                model.set_requires_gradient_sync(i + micro == local)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits, _ = model(x)
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
            (loss * (micro / local)).backward()
            loss_sum += loss.detach() * (micro / local)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1

        if step % config.log_every == 0 or step == config.steps:
            over = deadline is not None and runtime.main and time.monotonic() > deadline
            agreed = all_sum(torch.stack([loss_sum, torch.tensor(float(over), device=device)]), runtime).tolist()
            stopped = agreed[1] > 0 and step < config.steps
            now = time.perf_counter()
            seconds = now - window_start
            log = {
                "step": step,
                "loss": agreed[0] / (runtime.world_size * window_steps),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                "tokens": step * config.batch_size * config.seq_len,
                "tokens_per_s": window_steps * config.batch_size * config.seq_len / seconds,
                "step_ms": 1e3 * seconds / window_steps,
                "elapsed_s": now - run_start,
                "world_size": runtime.world_size,
            }
            if cuda:
                log["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if runtime.main:
                with metrics.open("a") as f:
                    f.write(json.dumps(log) + "\n")
                if on_log is not None:
                    on_log(log)
            loss_sum.zero_()
            window_steps = 0
            window_start = time.perf_counter()  # checkpoint time stays out of the next window
        if (config.save_every and step % config.save_every == 0) or step == config.steps or stopped:
            saved = checkpoint.save(out, model, optimizer, scheduler, step, runtime, record, config.keep_checkpoints)
            window_start = time.perf_counter()

    return {
        "start_step": start_step,
        "step": step,
        "complete": step >= config.steps,
        "resumed_from": None if resume_from is None else str(resume_from),
        "checkpoint": None if saved is None else str(saved),
        "world_size": runtime.world_size,
        "device": str(device),
        "params": sum(p.numel() for p in model.parameters()),
        "metrics": str(metrics),
    }
