"""Accuracy, time and a per-kernel profile of one deltaflex plan at one shape (GPU).

    python benchmarks/profile_plan.py --shape 4,4096,16,128 --plan compiled --out $OUT

Forward output and final state are compared with the float64 oracle; gradients with the float64
run of the eager plan (itself tested against the oracle's gradients in tests/), because autograd
through the oracle's token loop at this size would need tens of GB.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deltaflex import delta_rule
from deltaflex.bench import Shape, time_ms
from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import make_inputs, relative_error

NAMES = ("q", "k", "v", "beta")


def run(shape: Shape, plan: str, keys: str, out: Path | None, chunk_size: int) -> dict:
    dev = torch.device("cuda")
    x = make_inputs(shape.B, shape.T, shape.H, shape.K, shape.V, dtype=torch.bfloat16, device=dev, keys=keys)
    leaves = [x[n].detach().requires_grad_() for n in NAMES]
    do = torch.randn_like(x["v"])

    def fwd():
        return delta_rule(*leaves, chunk_size=chunk_size, plan=plan, output_final_state=True)

    def fwd_bwd():
        fwd()[0].backward(do)

    start = time.perf_counter()
    o, s = fwd()
    o.backward(do)
    torch.cuda.synchronize()
    result = {"shape": str(shape), "plan": plan, "keys": keys, "first_call_s": time.perf_counter() - start}

    o_ref, s_ref = recurrent_delta_rule_ref(**x, output_final_state=True)
    result["rel_err_o"] = relative_error(o, o_ref)
    result["rel_err_final_state"] = relative_error(s, s_ref)
    ref_leaves = [x[n].detach().double().requires_grad_() for n in NAMES]
    delta_rule(*ref_leaves, chunk_size=chunk_size, plan="eager")[0].backward(do.double())
    for n, ours, ref in zip(NAMES, leaves, ref_leaves):
        result[f"rel_err_d{n}"] = relative_error(ours.grad, ref.grad)

    with torch.no_grad():
        result["fwd_ms"] = time_ms(fwd, dev)
    result["fwd_bwd_ms"] = time_ms(fwd_bwd, dev, grad_to_none=leaves)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    result["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30

    if out is not None:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
            (out / f"profile_{plan}_{shape}_{name}.txt").write_text(table)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="4,4096,16,128")
    parser.add_argument("--plan", action="append")
    parser.add_argument("--keys", default="random")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    for plan in args.plan or ["compiled"]:
        result = run(Shape.parse(args.shape), plan, args.keys, args.out, args.chunk_size)
        print(json.dumps(result))
        if args.out:
            with open(args.out / "profile_plan.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
