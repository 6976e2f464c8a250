"""Training throughput of a ~125M-parameter DeltaNet LM, its two hybrids, a Transformer and the same
DeltaNet LM on fla's layer (issues 8 and 17).

    python benchmarks/bench_lm.py --out results/bench_lm                       # H200: 8 x 4096 tokens a step
    python benchmarks/bench_lm.py --seq 2048,4096,8192 --compile blocks --out results/bench_lm
    python benchmarks/bench_lm.py --quick --out /tmp/smoke                     # CPU smoke run at a tiny size

Models (`--models`, presets of deltaflex.models): deltanet, transformer (every layer global attention,
SDPA), deltanet-fla (the deltanet LM with each DeltaNet mixer swapped for fla's `fla.layers.DeltaNet`,
configured alike: the peer; skipped where fla is not importable), hybrid-sliding-window
(sliding-window attention every other layer, window --window), hybrid-global-attention (global
attention in layers 2 and L/2 + 1). Same width, depth, heads, vocabulary and SwiGLU MLP for all
(defaults: hidden 768, 12 layers, 12 heads, vocabulary 32000: ~125M parameters with tied embeddings).

Shapes: `--seq` is one T or a comma-separated list; each T runs at --tokens-per-step tokens a step
(batch = tokens / T), unless --batch sets the batch of a single T.

A training step: forward, cross-entropy over every position, backward, gradient clipping, fused
AdamW; bf16 autocast on CUDA, fp32 weights. `--compile model` (or bare `--compile`) compiles the whole
model, `--compile blocks` each block (one graph per kind of block, reused by the identical blocks:
far shorter compiles). Timed: --steps steps after --warmup steps (compiles happen there; their time
is first_steps_s).

Rows (model x T) run in order of how much they decide (the targets compare deltanet with the
Transformer and with fla at T = 8192 and 4096): at those T deltanet, transformer and deltanet-fla,
then the hybrids, then every other T. Results go to <out>/bench_lm.json after every row (keyed by
model, compile, plan, backend and B x T, so calls accumulate); a wall-clock budget (--max-minutes)
skips the rows it cannot fit; skipped rows are listed, and a table prints last.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltaflex.layers import DeltaNet
from deltaflex.models import CausalLM, preset

MODELS = ("deltanet", "transformer", "deltanet-fla", "hybrid-sliding-window", "hybrid-global-attention")
DECISIVE_MODELS = ("deltanet", "transformer", "deltanet-fla")  # what the targets compare
DECISIVE_SEQS = (8192, 4096)  # where the targets are set
COMPILE_SCOPES = ("model", "blocks")
RESULTS_FILE = "bench_lm.json"
FLA = "deltanet-fla"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/bench_lm"))
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    p.add_argument("--seq", default=None, help="T, or a comma-separated list of T (default 4096; --quick: 64)")
    p.add_argument("--tokens-per-step", type=int, default=None, help="batch x T for every T (default 32768; --quick: 128)")
    p.add_argument("--batch", type=int, default=None, help="the batch of a single --seq T (default: tokens-per-step / T)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--window", type=int, default=2048, help="sliding window of the hybrid-sliding-window model")
    p.add_argument("--attention-backend", default="sdpa", choices=("sdpa", "flex"))
    p.add_argument("--plan", default=None, help='the DeltaNet layers\' plan (default: the library\'s, "auto" on CUDA)')
    p.add_argument("--compile", nargs="?", const="model", default=False, choices=COMPILE_SCOPES,
                   help="torch.compile the whole model (bare --compile) or each block")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiles, autotuning)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget; rows that do not fit are skipped")
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.heads, args.vocab, args.window = 32, 4, 2, 64, 16
        args.steps, args.warmup = 2, 1
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(MODELS))
    if not args.models or unknown:
        p.error(f"--models must be a comma-separated subset of {MODELS}, got {args.models} (unknown: {unknown})")
    for name in ("steps", "warmup"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    args.seqs, args.batches = shapes(p, args)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def shapes(p: argparse.ArgumentParser, args) -> tuple[list[int], dict[int, int]]:
    """The T list and each T's batch: tokens-per-step / T, or --batch for a single T."""
    text = args.seq or ("64" if args.quick else "4096")
    try:
        seqs = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seqs = []
    if not seqs or min(seqs) < 1 or len(set(seqs)) != len(seqs):
        p.error(f"--seq must be a positive integer or a comma-separated list of distinct ones, got {text!r}")
    if args.batch is not None:
        if len(seqs) > 1:
            p.error(f"--batch sets the batch of a single T; with --seq {text} give --tokens-per-step instead")
        if args.batch < 1:
            p.error(f"--batch must be positive, got {args.batch}")
        return seqs, {seqs[0]: args.batch}
    tokens = args.tokens_per_step or (128 if args.quick else 32768)
    if tokens < 1:
        p.error(f"--tokens-per-step must be positive, got {tokens}")
    bad = [T for T in seqs if tokens % T]
    if bad:
        p.error(f"--tokens-per-step = {tokens} must be a multiple of every --seq T; {bad} do not divide it")
    return seqs, {T: tokens // T for T in seqs}


def row_order(models: list[str], seqs: list[int]) -> list[tuple[str, int]]:
    """(model, T) pairs, the decisive first (a budget cut then loses the least): the compared models at
    the targets' T, then the other models there, then every other T; longest T first within each."""

    def rank(pair):
        name, T = pair
        tier = (0 if name in DECISIVE_MODELS else 1) if T in DECISIVE_SEQS else 2
        return tier, -T, MODELS.index(name)

    return sorted(((m, T) for m in models for T in seqs), key=rank)


# ---------------------------------------------------------------------------------------------------
# fla's DeltaNet layer as the peer


class FlaMixer(nn.Module):
    """fla's DeltaNet layer behind our mixer's call, (x, cache=None, use_cache=False) -> (o, None)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    @property
    def o_proj(self) -> nn.Linear:  # CausalLM.reset_parameters scales each mixer's output projection
        return self.layer.o_proj

    def forward(self, hidden_states, cache=None, use_cache=False):
        if cache is not None or use_cache:
            raise NotImplementedError("the fla peer runs training steps only: no cache")
        o, _, _ = self.layer(hidden_states)
        return o, None


def fla_deltanet() -> type:
    """fla's DeltaNet layer class; imported only when the peer runs (fla is never a dependency)."""
    return importlib.import_module("fla.layers").DeltaNet


def fla_missing() -> str | None:
    """Why the peer cannot run here, or None."""
    try:
        fla_deltanet()
    except Exception as e:
        return f"fla is not importable ({type(e).__name__}: {e})"
    return None


def fla_options(ours: DeltaNet, layer_idx: int) -> dict:
    """fla's constructor arguments for the configuration of our layer `ours`. Every option maps one to
    one (our layer follows fla's names, data flow and parameters: the counts are equal). What differs
    is inside the ops, not the configuration: fla computes beta's sigmoid in the autocast dtype (ours
    in float32), and runs its own convolution and norm kernels."""
    conv_bias = ours.use_short_conv and ours.q_conv1d.bias is not None
    return dict(
        mode="chunk", hidden_size=ours.hidden_size, num_heads=ours.num_heads,
        expand_k=ours.key_dim / ours.hidden_size, expand_v=ours.value_dim / ours.hidden_size,
        use_beta=ours.use_beta, use_gate=ours.use_gate, use_short_conv=ours.use_short_conv,
        conv_size=ours.conv_size, conv_bias=conv_bias, allow_neg_eigval=ours.allow_neg_eigval,
        qk_activation=ours.qk_activation, qk_norm=ours.qk_norm, norm_eps=ours.o_norm.eps, layer_idx=layer_idx,
    )


def swap_in_fla(model: CausalLM, layer_class: type) -> CausalLM:
    """Replaces every DeltaNet mixer of `model` by `layer_class` (fla's DeltaNet) configured alike."""
    for i, block in enumerate(model.blocks):
        if isinstance(block.mixer, DeltaNet):
            block.mixer = FlaMixer(layer_class(**fla_options(block.mixer, i)))
    model.reset_parameters()  # the LM's own initialisation, over the new layers' projections too
    return model


# ---------------------------------------------------------------------------------------------------
# One row


def build(args, name: str) -> CausalLM:
    config = preset(
        "deltanet" if name == FLA else name, args.layers, vocab_size=args.vocab, hidden_size=args.hidden,
        num_heads=args.heads, window_size=args.window, attention_backend=args.attention_backend,
    )
    model = CausalLM(config, plan=args.plan)
    if name == FLA:
        swap_in_fla(model, fla_deltanet())
    return model.to(args.device)


def compiled(model: CausalLM, scope):
    """The callable a step runs. dynamic=False: a graph specialised to each (model, T), as a training
    run has; a symbolic T would not save the DeltaNet rows' compiles on CUDA anyway (the "auto" plan's
    shape buckets and the fused plan's segment choice guard on T), and every row builds its model afresh."""
    if scope == "blocks":
        # fla's layer keeps its layer_idx as a static int, so each of its blocks is a graph of its own: past
        # Dynamo's recompile limit (8) the rest ran uncompiled (H200, fifteenth session: 4 of 12 blocks)
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 2 * len(model.blocks))
        for block in model.blocks:
            block.compile(dynamic=False)  # identical blocks share one graph: one compile per kind of block
        return model
    return torch.compile(model, dynamic=False) if scope == "model" else model


def measure(args, name: str, T: int, batch: int) -> dict:
    """Times training steps of one model at batch x T; returns its row."""
    device = args.device
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = build(args, name)
    forward = compiled(model, args.compile)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    ids = torch.randint(0, args.vocab, (batch, T + 1), device=device)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits, _ = forward(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    first, loss = timed(step, args.warmup, device)
    seconds, loss = timed(step, args.steps, device)
    seconds /= args.steps
    return {
        **row_id(args, name, T, batch),
        "mixers": ["fla-deltanet" if isinstance(b.mixer, FlaMixer) else m for b, m in zip(model.blocks, model.config.mixers)],
        "params_M": model.num_parameters() / 1e6,
        "step_ms": 1e3 * seconds,
        "tokens_per_s": batch * T / seconds,
        "first_steps_s": first,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "loss": None if loss is None else loss.item(),
    }


def timed(step, n: int, device) -> tuple[float, torch.Tensor | None]:
    """Seconds for n steps, synchronised; and the last loss."""
    loss = None
    start = time.perf_counter()
    for _ in range(n):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, loss


def row_id(args, name: str, T: int, batch: int) -> dict:
    return {"model": name, "seq": T, "batch": batch, "compile": args.compile, "plan": args.plan,
            "attention_backend": args.attention_backend}


def row_key(row: dict) -> str:
    return f"{row['model']}|compile={row['compile']}|plan={row['plan']}|{row['attention_backend']}|{row['batch']}x{row['seq']}"


def record(rows: dict, row: dict) -> None:
    """Keeps the row, unless it is a skip over a row an earlier call measured."""
    old = rows.get(row_key(row))
    if "skipped" in row and old is not None and "skipped" not in old:
        return
    rows[row_key(row)] = row


def save(out: Path, rows: dict, env: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (RESULTS_FILE + ".tmp")
    tmp.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    tmp.replace(out / RESULTS_FILE)


# ---------------------------------------------------------------------------------------------------
# Table


def table(rows: list[dict]) -> str:
    """A plain table, longest T first; vs transformer / vs fla: this row's tokens/s over the
    Transformer's / the fla peer's at the same compile and shape. Skipped and failed rows last."""
    measured = [r for r in rows if "tokens_per_s" in r]
    by = {(r["model"], r["compile"], r["batch"], r["seq"]): r["tokens_per_s"] for r in measured}
    measured.sort(key=lambda r: (-r["seq"], r["batch"], str(r["compile"]), MODELS.index(r["model"]) if r["model"] in MODELS else 99))
    lines = [f"{'model':<26}{'T':>6}{'B':>4}{'compile':>8}{'params M':>9}{'tokens/s':>11}{'vs transf':>10}"
             f"{'vs fla':>8}{'step ms':>9}{'peak GiB':>9}{'first s':>8}"]
    for r in measured:
        shape = (r["compile"], r["batch"], r["seq"])
        peak = r.get("peak_gib")
        lines.append(
            f"{r['model']:<26}{r['seq']:>6}{r['batch']:>4}{str(r['compile']):>8}{r['params_M']:>9.4g}"
            f"{r['tokens_per_s']:>11.4g}{ratio(r, by.get(('transformer', *shape))):>10}"
            f"{ratio(r, by.get((FLA, *shape))) if r['model'] == 'deltanet' else '-':>8}"
            f"{r['step_ms']:>9.1f}{'-' if peak is None else format(peak, '.1f'):>9}{r['first_steps_s']:>8.1f}"
        )
    for r in rows:
        if "tokens_per_s" not in r:
            why = r.get("error") or f"skipped: {r.get('skipped')}"
            lines.append(f"{r['model']:<26}{r['seq']:>6}{r['batch']:>4}{str(r['compile']):>8}  {why[:90]}")
    return "\n".join(lines)


def ratio(row: dict, base: float | None) -> str:
    return "-" if base is None else format(row["tokens_per_s"] / base, ".2f")


# ---------------------------------------------------------------------------------------------------
# The run


class Budget:
    """--max-minutes over all rows: a row starts only if the time left exceeds the mean row so far."""

    def __init__(self, minutes: float | None):
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes
        self.durations: list[float] = []

    def fits(self) -> bool:
        if self.deadline is None:
            return True
        expected = sum(self.durations) / len(self.durations) if self.durations else 0.0
        return self.deadline - time.monotonic() > expected

    def spent(self, seconds: float) -> None:
        self.durations.append(seconds)


def environment(args) -> dict:
    env = {"device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu",
           "torch": torch.__version__}
    try:
        env["fla"] = getattr(importlib.import_module("fla"), "__version__", "?")
    except Exception:
        env["fla"] = None
    return env


def run_row(args, name: str, T: int, batch: int) -> dict:
    try:
        return measure(args, name, T, batch)
    except Exception as e:  # record and carry on: one GPU call must bring back all it can
        traceback.print_exc()
        return {**row_id(args, name, T, batch), "error": f"{type(e).__name__}: {e}"}
    finally:
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
        if args.compile:
            torch._dynamo.reset()  # each row compiles afresh; no cache growth across rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    env = environment(args)
    path = args.out / RESULTS_FILE
    rows = json.loads(path.read_text())["rows"] if path.exists() else {}
    missing_fla = fla_missing() if FLA in args.models else None
    budget = Budget(args.max_minutes)
    done = []
    for name, T in row_order(args.models, args.seqs):
        batch = args.batches[T]
        if name == FLA and missing_fla:
            row = {**row_id(args, name, T, batch), "skipped": missing_fla}
        elif not budget.fits():
            row = {**row_id(args, name, T, batch), "skipped": "the --max-minutes budget is spent"}
        else:
            start = time.monotonic()
            row = run_row(args, name, T, batch)
            budget.spent(time.monotonic() - start)
        record(rows, row)
        done.append(row)
        save(args.out, rows, env)
        print(f"{name} T={T}: skipped, {row['skipped']}" if "skipped" in row else json.dumps(row), flush=True)
    print(table(list(rows.values())))
    return done


if __name__ == "__main__":
    main()
