"""`deltaflex bench`: the benchmark protocol of docs/benchmarks.md (deltaflex plans, fla, causal SDPA)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import typer
from rich.table import Table

from .common import (PAPER_SHAPES, add_row, console, device_name, distinct_warnings, env, fmt, library_warnings,
                     parse_device, parse_dtype, parse_shapes, say)


def _bench_table(rows: list[dict]) -> Table:
    table = Table(title="delta rule benchmark (median ms; ratio = fla chunk time / this time)")
    for col in ("shape", "contender", "rel err", "fwd ms", "fwd+bwd ms", "fwd ratio", "fwd+bwd ratio", "peak extra GiB", "first call s"):
        table.add_column(col, justify="left" if col in ("shape", "contender") else "right")
    for r in rows:
        if "error" in r:
            add_row(table, r["shape"], r["contender"], r["error"], *["-"] * 6)
            continue
        add_row(
            table,
            r["shape"], r["contender"], fmt(r.get("rel_err"), ".1e"), fmt(r["fwd_ms"], ".3f"),
            fmt(r["fwd_bwd_ms"], ".3f"), fmt(r.get("fla_fwd_ratio"), ".2f"), fmt(r.get("fla_fwd_bwd_ratio"), ".2f"),
            fmt(r.get("peak_extra_gib"), ".2f"), fmt(r["first_call_s"], ".1f"),
        )
    return table


def _compile_line(plan: str, checks: dict) -> str:
    line = f"{plan}: warm start {checks['warm_start_s']:.1f} s"
    counts = checks.get("graphs_compiled_as_T_B_change")
    if counts is not None:
        line += ", graphs compiled as T and B change: " + ", ".join(f"{s} {n}" for s, n in counts.items())
    return line


def bench(
    shape: list[str] = typer.Option(None, help=f"B,T,H,K[,V]; repeatable. Default on CUDA: {PAPER_SHAPES}; 1,512,4,64 on CPU."),
    plan: list[str] = typer.Option(None, help="deltaflex plans to time: a name (auto: the tuned or default plan), or a spec such as state_group=8,cuda_graph=1 or triton,precision=bf16; repeatable. Default: fused (the default plan there) and compiled on CUDA, eager and compiled on CPU."),
    device: str = typer.Option(None, help="cuda, cuda:N or cpu. Default: cuda when available."),
    dtype: str = typer.Option(None, help="bf16, fp16, fp32 or fp64. Default: bf16 on CUDA, fp32 on CPU."),
    chunk_size: int = typer.Option(None, help="chunk size for every deltaflex plan (default: each plan's own, 64 unless its spec says)"),
    fla: bool = typer.Option(True, help="include fla-core's kernels when importable"),
    transformers: bool = typer.Option(True, help="include transformers' torch fallback (eager and compiled) when importable"),
    threads: int = typer.Option(None, min=1, help="torch.set_num_threads for the run (CPU)"),
    check: bool = typer.Option(True, help="check outputs against the float64 oracle first"),
    compile_checks: bool = typer.Option(True, help="for compiled plans: warm start in a new process and recompiles as T/B change"),
    out: Path = typer.Option(None, help="write bench.json here"),
    regime: str = typer.Option("training", help="training: the shapes above, forward and backward; prefill: long "
                               "prompts at few heads, forward only under inference_mode (deltaflex/bench_prefill.py; "
                               "its own shapes and contenders; --out gets prefill.jsonl)"),
):
    """Time deltaflex plans against fla and causal SDPA at the shapes of the paper's kernel benchmark."""
    if regime not in ("training", "prefill"):
        raise typer.BadParameter(f"expected training or prefill, got {regime!r}", param_hint="--regime")
    if regime == "prefill":
        from deltaflex.bench_prefill import run

        if not torch.cuda.is_available():
            raise typer.BadParameter("the prefill regime needs a CUDA device", param_hint="--regime")
        if out:
            out.mkdir(parents=True, exist_ok=True)
        run(out=str(out / "prefill.jsonl") if out else None, fla=fla, log=say)
        return
    from deltaflex.bench import Shape, paper_shapes, recompile_check, run_benchmark, warm_start_seconds

    dev = parse_device(device)
    dt = parse_dtype(dtype or ("bf16" if dev.type == "cuda" else "fp32"))
    shapes = parse_shapes(shape, lambda: paper_shapes() if dev.type == "cuda" else [Shape(1, 512, 4, 64, 64)])
    plans = plan or (["fused", "compiled"] if dev.type == "cuda" else ["eager", "compiled"])
    from deltaflex.plan import plan_from_spec

    for p in plans:
        try:
            plan_from_spec(p) if p != "auto" else None  # auto: the tuned or default plan per shape
        except (TypeError, ValueError) as e:
            raise typer.BadParameter(str(e), param_hint="--plan") from None
    if any(p != "eager" for p in plans):
        # Fresh compile caches, so first calls measure cold compiles (kept for the warm-start probe).
        cache = tempfile.mkdtemp(prefix="deltaflex-bench-")
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache, "inductor"))
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
    name = device_name(dev)
    say(f"device {dev}{'' if name == str(dev) else f' ({name})'}, dtype {dt}, torch {torch.__version__}, plans {plans}")
    extra = {}
    with library_warnings() as caught:
        rows = run_benchmark(shapes, plans, device=dev, dtype=dt, chunk_size=chunk_size, fla=fla, check=check,
                             log=say, transformers=transformers, threads=threads)
        if compile_checks:
            for p in (p for p in plans if p not in ("eager", "auto")):
                say(f"{p}: warm start (a first call in a new process, compile caches filled)...")
                extra[p] = {"warm_start_s": warm_start_seconds(shapes[0], p, dt, str(dev), chunk_size)}
                if dev.type == "cuda":
                    extra[p]["graphs_compiled_as_T_B_change"] = recompile_check(p, device=str(dev), dtype=dt)
                say(_compile_line(p, extra[p]))
    warned = distinct_warnings(caught)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps({"env": env(dev), "rows": rows, "compile": extra, "warnings": warned},
                                                   indent=1))
    console.print(_bench_table(rows))
    if warned:
        say(f"{len(warned)} distinct warning(s) from torch / Triton during the run"
            + (f": in {out / 'bench.json'}" if out else ":\n  " + "\n  ".join(warned)))
    failed = [r for r in rows if "error" in r or r.get("rel_err", 0) > 2e-2]
    if failed:
        console.print(f"[red]{len(failed)} contender(s) failed or exceeded the error bound[/red]")
        raise typer.Exit(1)
