"""The fused path's kernels on a GPU: forward and forward+backward against fla, every launch timed
alone, its launch parameters swept, and torch.profiler tables of deltaflex's and fla's kernels.

    python benchmarks/profile_kernels.py --shape 4,4096,16,128 --fla --profile --out $OUT
    python benchmarks/profile_kernels.py --shape 4,4096,16,128 --sweep --out $OUT

Per shape (B, T, H, D; bf16, k L2-normalised, chunk size 64): median ms of `triton.testing.do_bench`
for the forward and forward+backward and their peak memory above the inputs; with --profile, each
kernel's GPU time per call (torch.profiler, averaged over --iters calls); with --sweep, each launch
of deltaflex/fused/chunk.py alone under every launch configuration of SWEEP (the launches are
recorded from one real forward and backward, then replayed on their own arguments). One JSON line
per figure on stdout and in $OUT/profile_kernels.jsonl; a summary table last.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from deltaflex import delta_rule
from deltaflex.fused import chunk as fused
from deltaflex.testing import make_inputs

# launch parameters to try per kernel: block names with sizes, num_warps, num_stages
SWEEP = {  # 32-wide blocks at most where Triton 3.6 built right on the H200 (fused/chunk.py)
    "prepare_fwd_kernel": {"num_warps": (4,), "num_stages": (1, 2)},
    "prepare_bwd_kernel": {"num_warps": (4, 8), "num_stages": (1, 2)},
    "state_fwd_kernel": {"BV": (32, 64), "num_warps": (4, 8), "num_stages": (1, 2, 3)},
    "state_fwd_kernel[output]": {"BV": (64,), "num_warps": (4, 8), "num_stages": (1, 2, 3), "REUSE_KT": (False, True)},
    "state_bwd_kernel": {"BV": (32, 64), "num_warps": (2, 4, 8), "num_stages": (1, 2, 3), "PREFETCH_DV": (True, False)},
    "output_kernel": {"BV": (64, 128), "num_warps": (4,), "num_stages": (1, 2, 3)},
    "wy_grads_kernel": {"num_warps": (4, 8), "num_stages": (1, 2)},
    "qk_grads_kernel": {"BK": (64, 128), "num_warps": (4, 8), "num_stages": (1, 2, 3)},
}


def apply_flags(flags: dict) -> None:
    """Sets chunk.py attributes from JSON; a table keyed by head dim is updated (JSON's string keys as ints)."""
    for name, value in flags.items():
        if isinstance(value, dict):
            getattr(fused, name).update({int(d): v for d, v in value.items()})
        else:
            setattr(fused, name, value)


def grid_for(name, grid, kw):
    """A launch's grid under changed block sizes."""
    if name.startswith(("state_fwd_kernel", "state_bwd_kernel")):  # (cdiv(V, BV), sequences * H)
        return (triton.cdiv(kw["V"], kw["BV"]), grid[1])
    if name == "qk_grads_kernel":  # (cdiv(K, BK), chunks, B * H)
        return (triton.cdiv(kw["K"], kw["BK"]), *grid[1:])
    return grid


def ms(fn) -> float:
    return do_bench(fn, return_mode="median")


def inputs(B, T, H, D, requires_grad=False):
    x = make_inputs(B, T, H, D, dtype=torch.bfloat16, device="cuda")
    leaves = [x[n].requires_grad_(requires_grad) for n in ("q", "k", "v", "beta")]
    return leaves, torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)


def contenders(fla: bool) -> dict:
    out = {"deltaflex fused": lambda q, k, v, beta: delta_rule(q, k, v, beta, plan="fused")[0]}
    if fla:
        from fla.ops.delta_rule import chunk_delta_rule

        out["fla chunk"] = lambda q, k, v, beta: chunk_delta_rule(q, k, v, beta)[0]
    return out


def accuracy(name, forward, keys: str, shape=(2, 300, 4, 64)):
    """Relative errors of o and every gradient against the float64 oracle (autograd through its loop)."""
    from deltaflex.reference import recurrent_delta_rule_ref
    from deltaflex.testing import relative_error

    B, T, H, D = shape
    x = make_inputs(B, T, H, D, dtype=torch.bfloat16, device="cuda", keys=keys,
                    generator=torch.Generator(device="cuda").manual_seed(0))
    names = ("q", "k", "v", "beta")
    do = torch.randn(B, T, H, D, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    refs = [x[n].double().requires_grad_() for n in names]
    o_ref = recurrent_delta_rule_ref(*refs)[0]
    o_ref.backward(do.double())
    leaves = [x[n].clone().requires_grad_() for n in names]
    o = forward(*leaves)
    o.backward(do.bfloat16())
    errors = {"o": relative_error(o, o_ref)}
    errors.update({f"d{n}": relative_error(a.grad, r.grad) for n, a, r in zip(names, leaves, refs)})
    return {"contender": name, "keys": keys, "shape": "x".join(map(str, shape)), **errors}


def timings(shape, name, forward):
    B, T, H, D = shape
    leaves, do = inputs(B, T, H, D, requires_grad=True)
    forward(*leaves).backward(do)  # first call: compiles, autotunes
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward(*leaves).backward(do)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    with torch.no_grad():
        fwd = ms(lambda: forward(*leaves))
    both = ms(lambda: forward(*leaves).backward(do))
    return {"contender": name, "fwd_ms": fwd, "fwd_bwd_ms": both, "peak_extra_gib": peak}


def kernel_table(shape, name, forward, iters: int):
    """GPU time per call of each kernel one forward+backward launches (torch.profiler)."""
    B, T, H, D = shape
    leaves, do = inputs(B, T, H, D, requires_grad=True)
    forward(*leaves).backward(do)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            forward(*leaves).backward(do)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        gpu_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if gpu_us > 0:
            rows.append({"contender": name, "kernel": e.key[:60], "calls": e.count / iters, "ms": gpu_us / iters / 1e3})
    return sorted(rows, key=lambda r: -r["ms"])


def recorded_launches(shape):
    """(kernel, grid, args, kwargs) of one fused forward with the output in the state pass (where
    fused.OUTPUT_IN_STATE has it at this head dim), one with the output kernel after it, and one
    backward, launched as recorded."""
    B, T, H, D = shape
    (q, k, v, beta), do = inputs(B, T, H, D)
    calls, real, saved, step_ms = [], fused.launch, dict(fused.OUTPUT_IN_STATE), fused.OUTPUT_STEP_MS

    def record(kernel, grid, *args, **kwargs):
        calls.append((kernel, grid, args, kwargs))
        real(kernel, grid, *args, **kwargs)

    fused.launch = record
    try:
        fused.OUTPUT_STEP_MS = dict.fromkeys(step_ms, 0.0)  # where OUTPUT_IN_STATE has it at all, whatever the shape
        for in_state in ((True, False) if saved[fused.launch_dims(D)] else (False,)):
            fused.OUTPUT_IN_STATE.update({d: in_state for d in saved})
            o, final, t = fused.fused_forward(q, k, v, beta, None, D ** -0.5, 64)
        fused.fused_backward(q, k, v, beta, t, None, do, None, D ** -0.5, 64)
    finally:
        fused.launch = real
        fused.OUTPUT_IN_STATE.update(saved)
        fused.OUTPUT_STEP_MS = step_ms
    return calls


def kernel_label(kernel, kwargs) -> str:
    """The kernel's name, with "[output]" for the state pass that writes the output (its own launch
    parameters: fused.LAUNCH's "state_out")."""
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
    return name + ("[output]" if kwargs.get("OUTPUT") else "")


def launch_key(label: str) -> str:
    """fused.LAUNCH's key for a kernel label."""
    return "state_out" if label == "state_fwd_kernel[output]" else label.removesuffix("_kernel")


def sweep(shape, spaces=SWEEP):
    """Each recorded launch alone under every configuration of `spaces` (kernel name -> parameter ->
    values; the first of two launches of one kernel only: the forward state pass runs in both directions)."""
    seen = set()
    for kernel, grid, args, kwargs in recorded_launches(shape):
        name = kernel_label(kernel, kwargs)
        if name in seen or name not in spaces:
            continue
        seen.add(name)
        space = spaces[name]
        for values in itertools.product(*space.values()):
            cfg = dict(zip(space, values))
            kw = {**kwargs, **cfg}
            g = grid_for(name, grid, kw)
            try:
                t = ms(lambda: kernel[g](*args, **kw))
            except Exception as e:  # out of resources: recorded, not fatal
                t = f"{type(e).__name__}: {str(e)[:100]}"
            yield {"kernel": name, **cfg, "ms": t, "default": all(kwargs.get(n) == v for n, v in cfg.items())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help="B,T,H,D (default 4,4096,16,128)")
    parser.add_argument("--fla", action="store_true", help="fla's chunk_delta_rule as a contender")
    parser.add_argument("--profile", action="store_true", help="per-kernel GPU times (torch.profiler)")
    parser.add_argument("--sweep", action="store_true", help="each fused launch under every configuration")
    parser.add_argument("--accuracy", action="store_true",
                        help="errors of o and every gradient against the float64 oracle, random and correlated keys")
    parser.add_argument("--space", type=json.loads, default=None,
                        help='--sweep only these: JSON {kernel: {parameter: [values]}}, keyed by head dim '
                             '("64", "128", "256") where it varies, e.g. {"128": {"qk_grads_kernel": {"BK": [64, 128]}}}')
    parser.add_argument("--launch", type=Path, action="append", default=[],
                        help="a fused_launch_{D}.json that --sweep wrote: its launch parameters replace "
                             "fused.LAUNCH's at head dim D for this run")
    parser.add_argument("--flags", type=json.loads, default={},
                        help='chunk.py attributes for this run, JSON; a table by head dim is updated, e.g. '
                             '{"OUTPUT_IN_STATE": {"256": true}} (the sweep then records that pass at 256 too)')
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    apply_flags(args.flags)
    for path in args.launch:
        if path.exists():
            D = int(path.stem.rsplit("_", 1)[1])
            for kernel, cfg in json.loads(path.read_text()).items():
                fused.LAUNCH[D][kernel] = {**fused.LAUNCH[D][kernel], **cfg}
            print(f"launch parameters at head dim {D}: {fused.LAUNCH[D]}", flush=True)
    out = None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        out = open(args.out / "profile_kernels.jsonl", "a")
    summary = []

    def emit(row):
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    if args.accuracy:
        for keys in ("random", "correlated"):
            for name, forward in contenders(args.fla).items():
                row = accuracy(name, forward, keys)
                emit(row)
                summary.append(f"{row['shape']:>15} {name:<16} {keys:<10} " + " ".join(
                    f"{n} {row[n]:.2e}" for n in ("o", "dq", "dk", "dv", "dbeta")))
    texts = args.shape or ["4,4096,16,128"]
    # the first timings of a process run slow (the first shape of every H200 run, tenth session): a
    # discarded round at the first shape
    for name, forward in contenders(args.fla).items():
        timings(tuple(map(int, texts[0].split(","))), name, forward)
    for text in texts:
        shape = tuple(map(int, text.split(",")))
        for name, forward in contenders(args.fla).items():
            row = {"shape": text, **timings(shape, name, forward)}
            emit(row)
            summary.append(f"{text:>15} {name:<16} fwd {row['fwd_ms']:.3f} ms  fwd+bwd {row['fwd_bwd_ms']:.3f} ms  "
                           f"peak extra {row['peak_extra_gib']:.2f} GiB")
            if args.profile:
                for r in kernel_table(shape, name, forward, args.iters):
                    emit({"shape": text, **r})
                    summary.append(f"{'':>15}   {r['kernel']:<60} x{r['calls']:.0f} {r['ms']:.3f} ms")
        if args.sweep:
            best = {}
            spaces = SWEEP if args.space is None else args.space.get(str(shape[3]), args.space)
            for row in sweep(shape, spaces):
                emit({"shape": text, **row})
                if isinstance(row["ms"], float):
                    if row["default"]:
                        best.setdefault(row["kernel"], {})["default"] = row["ms"]
                    if row["ms"] < best.setdefault(row["kernel"], {}).get("ms", float("inf")):
                        best[row["kernel"]].update(ms=row["ms"], cfg={n: v for n, v in row.items()
                                                                        if n not in ("kernel", "ms", "default")})
            for name, b in best.items():
                summary.append(f"{text:>15} sweep {name:<24} default {b.get('default', float('nan')):.3f} ms, "
                               f"best {b['ms']:.3f} ms at {b['cfg']}")
            if {"state_fwd_kernel[output]", "state_fwd_kernel", "output_kernel"} <= set(best):
                apart = best["state_fwd_kernel"]["ms"] + best["output_kernel"]["ms"]
                summary.append(f"{text:>15} forward's state pass + output: in one launch "
                               f"{best['state_fwd_kernel[output]']['ms']:.3f} ms, apart {apart:.3f} ms (best of each)")
            if args.out:  # the best launch parameters per kernel, as fused.LAUNCH spells them
                D = shape[3]
                path = args.out / f"fused_launch_{D}.json"
                path.write_text(json.dumps({launch_key(name): b["cfg"] for name, b in best.items()}))
    print("\n".join(summary))


if __name__ == "__main__":
    main()
