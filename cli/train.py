"""`deltaflex train`: train a CausalLM on a token file or MQAR, on one process or under torchrun."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .common import console, fail, parse_device, say

# --quick: a tiny model and run for the sizes not given (CPU smoke run)
QUICK = {"layers": 2, "hidden": 32, "heads": 2, "vocab": 64, "seq_len": 64, "batch_size": 4, "steps": 20,
         "warmup": 2, "log_every": 5, "mqar_pairs": 8}
FULL = {"layers": 12, "hidden": 768, "heads": 12, "vocab": 32000, "seq_len": 2048, "batch_size": 8, "steps": 1000,
        "warmup": 100, "log_every": 10, "mqar_pairs": 64}


def _model_config(preset_name, config_path, layers, hidden, heads, vocab, window):
    from deltaflex.models import LMConfig, preset

    if config_path is not None:
        given = [name for name, v in (("--layers", layers), ("--hidden", hidden), ("--heads", heads),
                                      ("--vocab", vocab), ("--window", window)) if v is not None]
        if given:
            raise typer.BadParameter(f"--config sets the model; drop {', '.join(given)}", param_hint="--config")
        if not config_path.is_file():
            raise typer.BadParameter(f"{str(config_path)!r} does not exist", param_hint="--config")
        return LMConfig.from_json(config_path)
    sizes = {"vocab_size": vocab, "hidden_size": hidden, "num_heads": heads, "window_size": window}
    return preset(preset_name, layers, **{k: v for k, v in sizes.items() if v is not None})


def _on_rank_0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train(
    data: str = typer.Option(..., help='a token file (flat uint16/uint32 ids, e.g. nanoGPT\'s .bin) or "mqar" (synthetic)'),
    out: Path = typer.Option(Path("runs/deltaflex"), help="run folder: run.json, metrics.jsonl, checkpoints/; resumes from its newest checkpoint"),
    preset: str = typer.Option("deltanet", help="model preset: deltanet, linear, transformer, hybrid-sliding-window, hybrid-global-attention"),
    config: Path = typer.Option(None, help="an LMConfig JSON file instead of --preset and the size options"),
    layers: int = typer.Option(None, help="layers of the preset [12]"),
    hidden: int = typer.Option(None, help="model width [768]"),
    heads: int = typer.Option(None, help="heads of every mixer (must divide --hidden) [12]"),
    vocab: int = typer.Option(None, help="vocabulary size [32000]"),
    window: int = typer.Option(None, help="window of sliding-window attention layers [2048]"),
    token_dtype: str = typer.Option("uint16", help="the token file's id type: uint16 or uint32"),
    mqar_pairs: int = typer.Option(None, help="with --data mqar: key-value pairs a sequence [64]"),
    seq_len: int = typer.Option(None, help="tokens a sequence [2048]"),
    batch_size: int = typer.Option(None, help="sequences a step, over all ranks [8]"),
    micro_batch_size: int = typer.Option(None, help="sequences a rank's forward (gradient accumulation when smaller) [batch / ranks]"),
    steps: int = typer.Option(None, help="training steps [1000]"),
    lr: float = typer.Option(3e-4, help="peak learning rate"),
    min_lr_ratio: float = typer.Option(0.1, help="the cosine ends at lr * this"),
    warmup: int = typer.Option(None, help="linear warm-up steps [100]"),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay (matrices and embeddings)"),
    grad_clip: float = typer.Option(1.0, help="max global gradient norm (0: no clipping)"),
    seed: int = typer.Option(0, help="seed of the weights and the data order"),
    bf16: bool = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast over fp32 weights [on CUDA]"),
    compile: bool = typer.Option(False, help="torch.compile the model (each block under torchrun)"),
    plan: str = typer.Option(None, help="the DeltaNet layers' delta-rule plan [the library's: auto on CUDA, eager on CPU]"),
    log_every: int = typer.Option(None, help="steps between metric records [10]"),
    save_every: int = typer.Option(0, help="steps between checkpoints (0: only at the end)"),
    keep: int = typer.Option(2, help="checkpoints kept (the newest)"),
    device: str = typer.Option(None, help="cuda or cpu (under torchrun each rank takes its LOCAL_RANK's GPU) [cuda when available]"),
    max_minutes: float = typer.Option(None, help="wall-clock budget: then a checkpoint and stop; the same command resumes"),
    quick: bool = typer.Option(False, help="a tiny model and run (CPU smoke run) for the sizes not given"),
):
    """Train a CausalLM: AdamW, warm-up + cosine, clipping, bf16 autocast; FSDP2 under torchrun; resumable DCP checkpoints."""
    from deltaflex.models.mqar import MQARTask
    from deltaflex.train import MQARData, TokenFile, TrainConfig
    from deltaflex.train import train as run_training

    sizes = QUICK if quick else FULL
    given = {"layers": layers, "seq_len": seq_len, "batch_size": batch_size, "steps": steps, "warmup": warmup,
             "log_every": log_every, "mqar_pairs": mqar_pairs}
    given = {k: sizes[k] if v is None else v for k, v in given.items()}
    if config is None and quick:
        hidden, heads, vocab = (sizes[k] if v is None else v for k, v in (("hidden", hidden), ("heads", heads), ("vocab", vocab)))
    dev = parse_device(device)
    if max_minutes is not None and max_minutes <= 0:
        raise typer.BadParameter(f"expected a positive number of minutes, got {max_minutes}", param_hint="--max-minutes")
    main = _on_rank_0()
    try:
        model_config = _model_config(preset, config, layers if config is not None else given["layers"], hidden, heads, vocab, window)
        train_config = TrainConfig(
            steps=given["steps"], batch_size=given["batch_size"], seq_len=given["seq_len"], micro_batch_size=micro_batch_size,
            lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=given["warmup"], weight_decay=weight_decay, grad_clip=grad_clip,
            seed=seed, bf16=bf16, compile=compile, plan=plan, log_every=given["log_every"], save_every=save_every,
            keep_checkpoints=keep)
        if data == "mqar":
            source = MQARData(MQARTask(model_config.vocab_size, train_config.seq_len, given["mqar_pairs"]), seed)
        else:
            source = TokenFile(data, token_dtype, train_config.seq_len, model_config.vocab_size, seed)
    except (ValueError, TypeError, FileNotFoundError) as e:
        fail(str(e)) if main else _exit()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if main:
        say(f"training {model_config.num_layers} layers x {model_config.hidden_size} ({preset if config is None else config}) "
            f"on {data} for {train_config.steps} steps of {train_config.batch_size} x {train_config.seq_len} tokens, "
            f"{world} rank(s) on {dev.type}, compile {compile}; run folder {out}")

    with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console, disable=not main) as progress:
        bar = progress.add_task("train", total=train_config.steps, info="")
        records = []

        def on_log(r: dict):
            records.append(r)
            mem = f" {r['peak_gib']:.1f} GiB" if "peak_gib" in r else ""
            info = f"loss {r['loss']:.4f} {r['tokens_per_s']:.4g} tok/s{mem} lr {r['lr']:.2e}"
            progress.update(bar, completed=r["step"], info=info)
            if not console.is_terminal:  # a log file gets a line a record (the bar is drawn once, at the end)
                progress.console.print(f"step {r['step']}: {info}", markup=False, highlight=False)

        try:
            summary = run_training(model_config, train_config, source, out, device=dev, max_minutes=max_minutes, on_log=on_log)
        except (ValueError, TypeError, FileNotFoundError) as e:
            fail(str(e)) if main else _exit()
    if main:
        if summary["resumed_from"]:
            say(f"resumed from {summary['resumed_from']}")
        state = "complete" if summary["complete"] else "stopped by --max-minutes; the same command resumes"
        say(f"step {summary['step']} of {train_config.steps} ({state}); {summary['params'] / 1e6:.1f}M parameters; "
            f"metrics: {summary['metrics']}; checkpoint: {summary['checkpoint']}")
        if len(records) > 1:  # the first window holds the compiles
            rates = sorted(r["tokens_per_s"] for r in records[1:])
            say(f"tokens/s after the first {records[0]['step'] - summary['start_step']} steps: median "
                f"{rates[len(rates) // 2]:.4g} over {len(rates)} records of {train_config.log_every} steps")


def _exit():
    raise typer.Exit(1)
