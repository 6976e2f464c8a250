"""Times of the Triton stage kernels, the fused forward, and the state passes' launch parameters (GPU).

    python benchmarks/profile_kernels.py --out $OUT                  # every benchmark shape
    python benchmarks/profile_kernels.py --shape 4,4096,16,128 --sweep

Per shape (B, T, H, D; bf16, k L2-normalised, chunk size 64 unless --chunk-size), median ms of
`triton.testing.do_bench` for
- each stage's forward and backward, Triton kernels (and the compiled stages' eager ops, for scale);
- the forward four ways: Triton stages (solve, wy, state, output: four launches, per-chunk states
  written), fused (kernels/fused.py: two launches, no states), and each fused kernel alone;
- with --sweep, every (BV, num_warps, num_stages) of the passes over chunks (state forward,
  backward, fused state+output), for PASS_CONFIGS in deltaflex/kernels/state.py.
One JSON line per figure on stdout (and in $OUT/profile_kernels.jsonl with --out).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from pathlib import Path

import torch
from triton.testing import do_bench

from deltaflex.chunk.layout import to_chunks
from deltaflex.chunk.matmul import make_dot
from deltaflex.chunk.stages import implementation
from deltaflex.chunk.state import Stepping
from deltaflex.kernels import fused
from deltaflex.testing import make_inputs

LOOP = Stepping("loop", 1)

BENCH_SHAPES = ["8,2048,32,64", "4,4096,32,64", "2,8192,32,64", "8,2048,16,128", "4,4096,16,128",
                "2,8192,16,128", "8,2048,8,256", "4,4096,8,256", "2,8192,8,256"]


def chunk_inputs(B, T, H, D, C, policy):
    x = make_inputs(B, T, H, D, dtype=torch.bfloat16, device="cuda")
    q, k, v = (to_chunks(x[n], C, torch.bfloat16).flatten(2, 3) for n in "qkv")
    beta = to_chunks(x["beta"], C, torch.float32).flatten(2, 3)
    dot = make_dot(policy, torch.bfloat16)
    t = implementation("solve", "triton")[0](k, beta, dot)
    w, u = implementation("wy", "triton")[0](t, k, v, beta, dot)
    s0 = torch.zeros(B, H, D, D, device="cuda")
    v_new, states, _ = implementation("state", "triton")[0](k, w, u, s0, dot, LOOP, None)
    do = torch.randn_like(v_new).to(torch.bfloat16)
    return dict(q=q, k=k, v=v, beta=beta, dot=dot, t=t, w=w, u=u, s0=s0, v_new=v_new, states=states, do=do,
                dt=torch.randn_like(t).tril(-1), dw=torch.randn_like(w), du=torch.randn_like(u),
                dv_local=torch.randn_like(v_new), ds=torch.randn_like(s0), scale=D**-0.5, policy=policy)


def stage_calls(x):
    return {
        "solve": (lambda f: f(x["k"], x["beta"], x["dot"]),
                  lambda f: f(x["k"], x["beta"], x["t"], x["dt"], x["dot"])),
        "wy": (lambda f: f(x["t"], x["k"], x["v"], x["beta"], x["dot"]),
               lambda f: f(x["t"], x["k"], x["v"], x["beta"], x["dw"], x["du"], x["dot"])),
        "state": (lambda f: f(x["k"], x["w"], x["u"], x["s0"], x["dot"], LOOP, None),
                  lambda f: f(x["q"], x["k"], x["w"], x["v_new"], x["states"], x["do"], x["dv_local"], x["ds"],
                              x["scale"], x["dot"], LOOP, None)),
        "output": (lambda f: f(x["q"], x["k"], x["v_new"], x["states"], x["scale"], x["dot"]),
                   lambda f: f(x["q"], x["k"], x["v_new"], x["states"], x["do"], x["scale"], x["dot"])),
    }


def ms(fn) -> float:
    return do_bench(fn, return_mode="median")


def profile_shape(shape: str, C: int, policy: str, sweep: bool, compiled: bool):
    B, T, H, D = map(int, shape.split(","))
    x = chunk_inputs(B, T, H, D, C, policy)
    base = {"shape": shape, "chunk_size": C, "policy": policy}
    for stage, calls in stage_calls(x).items():
        for backend in ("triton", "compiled") if compiled else ("triton",):
            for direction, call in zip(("forward", "backward"), calls):
                f = implementation(stage, backend)[direction == "backward"]
                yield {**base, "what": f"{stage} {direction}", "backend": backend, "ms": ms(lambda: call(f))}
    q, k, v, beta, s0 = x["q"], x["k"], x["v"], x["beta"], x["s0"]
    grouped = tuple(t.unsqueeze(3) for t in (q, k, v, beta))  # forward_chunks' layout: groups of one chunk
    opts = dict(scale=x["scale"], use_qk_l2norm=False, policy=policy)
    from deltaflex.chunk.function import forward_chunks

    yield {**base, "what": "forward, triton stages", "ms": ms(
        lambda: forward_chunks(*grouped, s0, None, **opts, stepping=LOOP, backends=(("triton", None),) * 4))}
    yield {**base, "what": "forward, fused", "ms": ms(lambda: fused.forward_chunks(q, k, v, beta, s0, **opts))}
    yield {**base, "what": "fused solve+wy", "ms": ms(lambda: fused.solve_wy_fwd(k, v, beta, policy, k.dtype))}
    yield {**base, "what": "fused state+output", "ms": ms(
        lambda: fused.state_output_fwd(q, k, x["w"], x["u"], s0, x["scale"], policy, k.dtype))}
    if not sweep:
        return
    (call_fwd, call_bwd), (fwd, bwd) = stage_calls(x)["state"], implementation("state", "triton")
    passes = {  # each launched with (BV, num_warps, num_stages)
        "forward": lambda *c: call_fwd(functools.partial(fwd, config=((("BV", c[0]),), c[1], c[2]))),
        "backward": lambda *c: call_bwd(functools.partial(bwd, config=((("BV", c[0]),), c[1], c[2]))),
        "state_output": lambda *c: fused.state_output_fwd(q, k, x["w"], x["u"], s0, x["scale"], policy, k.dtype, *c),
    }
    for (kind, fn), BV, num_warps, num_stages in itertools.product(passes.items(), (16, 32, 64), (4, 8), (1, 2, 3)):
        cfg = dict(BV=BV, num_warps=num_warps, num_stages=num_stages)
        try:
            t = ms(lambda: fn(BV, num_warps, num_stages))
        except Exception as e:  # out of shared memory or registers: recorded, not fatal
            t = f"{type(e).__name__}: {str(e)[:120]}"
        yield {**base, "what": f"sweep {kind}", **cfg, "ms": t}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help="B,T,H,D (default: every benchmark shape)")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--policy", default="bf16x3", choices=["bf16x3", "bf16", "fp32"])
    parser.add_argument("--sweep", action="store_true", help="time every launch configuration of the passes")
    parser.add_argument("--compiled", action="store_true", help="also the compiled stages' eager ops")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        out = open(args.out / "profile_kernels.jsonl", "a")
    for shape in args.shape or BENCH_SHAPES:
        for row in profile_shape(shape, args.chunk_size, args.policy, args.sweep, args.compiled):
            line = json.dumps(row)
            print(line, flush=True)
            if out:
                out.write(line + "\n")


if __name__ == "__main__":
    main()
