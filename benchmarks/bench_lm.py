"""Training throughput of a ~125M-parameter DeltaNet LM, its two hybrids and a Transformer (issue 8).

    python benchmarks/bench_lm.py --out results/bench_lm                 # H200: batches of 8 x 4096 tokens
    python benchmarks/bench_lm.py --compile --out results/bench_lm       # the models under torch.compile
    python benchmarks/bench_lm.py --quick --out /tmp/smoke               # CPU smoke run at a tiny size

Models (`--models`, presets of deltaflex.models): deltanet, hybrid-sliding-window (sliding-window
attention every other layer, window --window), hybrid-global-attention (global attention in layers 2
and L/2 + 1), transformer (every layer global attention, SDPA). Same width, depth, heads, vocabulary
and SwiGLU MLP for all (defaults: hidden 768, 12 layers, 12 heads, vocabulary 32000: ~125M
parameters with tied embeddings). A training step: forward, cross-entropy over every position,
backward, gradient clipping, fused AdamW; bf16 autocast on CUDA, fp32 weights. Timed: --steps steps
after --warmup steps (compiles happen there; their time is reported as first_steps_s).
Results go to <out>/bench_lm.json after every model (keyed by model, compile and plan, so calls with
--models subsets or --compile accumulate); a wall-clock budget (--max-minutes) skips the models left
when it runs out; a short table prints last.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from deltaflex.models import CausalLM, preset

MODELS = ("deltanet", "hybrid-sliding-window", "hybrid-global-attention", "transformer")
RESULTS_FILE = "bench_lm.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/bench_lm"))
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--window", type=int, default=2048, help="sliding window of the hybrid-sliding-window model")
    p.add_argument("--attention-backend", default="sdpa", choices=("sdpa", "flex"))
    p.add_argument("--plan", default=None, help='the DeltaNet layers\' plan (default: the library\'s, "auto" on CUDA)')
    p.add_argument("--compile", action="store_true", help="torch.compile the whole training step's model")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiles, autotuning)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget; models left when it ends are skipped")
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.hidden, args.layers, args.heads, args.vocab, args.window = 2, 64, 32, 4, 2, 64, 16
        args.steps, args.warmup = 2, 1
    args.models = [m for m in args.models.split(",") if m]
    if not args.models or set(args.models) - set(MODELS):
        p.error(f"--models must be a comma-separated subset of {MODELS}, got {args.models}")
    for name in ("batch", "seq", "steps", "warmup"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def build(args, name: str) -> CausalLM:
    config = preset(
        name, args.layers, vocab_size=args.vocab, hidden_size=args.hidden, num_heads=args.heads,
        window_size=args.window, attention_backend=args.attention_backend,
    )
    return CausalLM(config, plan=args.plan).to(args.device)


def measure(args, name: str) -> dict:
    """Times training steps of one model; returns its row."""
    device = args.device
    torch.manual_seed(0)
    model = build(args, name)
    forward = torch.compile(model) if args.compile else model
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
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

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    row = {
        "model": name,
        "mixers": list(model.config.mixers),
        "params_M": model.num_parameters() / 1e6,
        "batch": args.batch,
        "seq": args.seq,
        "compile": args.compile,
        "plan": args.plan,
        "attention_backend": args.attention_backend,
        "step_ms": 1e3 * seconds,
        "tokens_per_s": args.batch * args.seq / seconds,
        "first_steps_s": first,
        "loss": loss.item(),
    }
    if cuda:
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def row_key(row: dict) -> str:
    return f"{row['model']}|compile={row['compile']}|plan={row['plan']}|{row['attention_backend']}|{row['batch']}x{row['seq']}"


def save(out: Path, rows: dict, env: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (RESULTS_FILE + ".tmp")
    tmp.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    tmp.replace(out / RESULTS_FILE)


def table(rows: list[dict]) -> str:
    """A plain table; ratio = this model's tokens/s over the Transformer's (same compile and shape)."""
    base = {(r["compile"], r["batch"], r["seq"]): r["tokens_per_s"] for r in rows if r["model"] == "transformer" and "error" not in r}
    lines = [f"{'model':<26}{'compile':>8}{'params M':>10}{'tokens/s':>12}{'vs transformer':>16}{'step ms':>10}{'peak GiB':>10}{'first s':>9}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<26}{str(r['compile']):>8}  error: {r['error'][:80]}")
            continue
        ratio = base.get((r["compile"], r["batch"], r["seq"]))
        lines.append(
            f"{r['model']:<26}{str(r['compile']):>8}{r['params_M']:>10.1f}{r['tokens_per_s']:>12.4g}"
            f"{'-' if ratio is None else format(r['tokens_per_s'] / ratio, '.2f'):>16}{r['step_ms']:>10.1f}"
            f"{r.get('peak_gib', float('nan')):>10.1f}{r['first_steps_s']:>9.1f}"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    env = {"device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu",
           "torch": torch.__version__}
    path = args.out / RESULTS_FILE
    rows = json.loads(path.read_text())["rows"] if path.exists() else {}
    deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes
    done = []
    for name in args.models:
        if deadline is not None and time.monotonic() > deadline:
            print(f"{name}: skipped, the --max-minutes budget is spent")
            continue
        try:
            row = measure(args, name)
        except Exception as e:  # record and carry on: one GPU call must bring back all it can
            traceback.print_exc()
            row = {"model": name, "compile": args.compile, "plan": args.plan, "attention_backend": args.attention_backend,
                   "batch": args.batch, "seq": args.seq, "error": f"{type(e).__name__}: {e}"}
        rows[row_key(row)] = row
        done.append(row)
        save(args.out, rows, env)
        print(json.dumps(row), flush=True)
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
        if args.compile:
            torch._dynamo.reset()  # each model compiles afresh; no cache growth across models
    print(table(list(rows.values())))
    return done


if __name__ == "__main__":
    main()
