"""Accuracy, time, memory and a per-kernel profile of deltaflex plans (and fla) at one shape (GPU).

    python benchmarks/profile_plan.py --shape 4,4096,16,128 --plan compiled \
        --plan chunk_size=128,precision=bf16 --fla --out $OUT
    python benchmarks/profile_plan.py --shape 4,4096,16,128 --packed-mean 512 --fla   # cu_seqlens

A --plan is a plan name or comma-separated Plan fields (chunk_size=128,precision=bf16,unroll=1).
The hand-written Triton plans (deltaflex/kernels):

    python benchmarks/profile_plan.py --shape 4,4096,16,128 --fla --out $OUT --plan triton \
        --plan mixed-state --plan solve=triton,wy=triton,state=triton,output=triton \
        --plan solve=triton,wy=triton,state=triton,output=triton,compile=0,precision=bf16 \
        --plan solve=triton,wy=triton,state=triton,output=triton,compile=0,chunk_size=128

("triton" is every stage a kernel with no torch.compile; the fields spelling with compile left on
wraps the kernels' glue in torch.compile; precision=bf16 rounds inexact operands once, as fla does.)
Forward outputs are compared with the float64 oracle; gradients with the float64 run of the eager
plan (itself tested against the oracle's gradients in tests/), because autograd through the
oracle's token loop at this size would need tens of GB. --recompiles also runs the first plan at
other T and B and counts the graphs compiled.
"""

from __future__ import annotations

import argparse
import json
import traceback
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from deltaflex import Plan, delta_rule
from deltaflex.bench import Shape, time_ms
from deltaflex.plan import plan_from_spec
from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import make_inputs, relative_error

NAMES = ("q", "k", "v", "beta")


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def random_lengths(total: int, mean: int, generator: torch.Generator) -> list[int]:
    """Document lengths (exponential, at least 1) that add up to `total` tokens."""
    lengths = []
    while sum(lengths) < total:
        lengths.append(max(1, int(torch.empty(1).exponential_(1 / mean, generator=generator))))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def measure(name, forward, x, refs, do, profile_file):
    leaves = [x[n].detach().requires_grad_() for n in NAMES]

    def fwd():
        return forward(*leaves)

    def fwd_bwd():
        fwd()[0].backward(do)

    graphs, start = _graphs(), time.perf_counter()
    o, s = fwd()
    o.backward(do)
    torch.cuda.synchronize()
    result = {"contender": name, "first_call_s": time.perf_counter() - start, "graphs": _graphs() - graphs}
    result["err_o"] = relative_error(o, refs["o"])
    if s is not None:
        result["err_final_state"] = relative_error(s, refs["final_state"])
    for n, leaf in zip(NAMES, leaves):
        result[f"err_d{n}"] = relative_error(leaf.grad, refs[f"d{n}"])
    with torch.no_grad():
        result["fwd_ms"] = time_ms(fwd, torch.device("cuda"))
    result["fwd_bwd_ms"] = time_ms(fwd_bwd, torch.device("cuda"), grad_to_none=leaves)
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    result["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    if profile_file is not None:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fwd_bwd()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=80)
        with open(profile_file, "a") as f:
            f.write(f"\n## {name} forward+backward\n{table}\n")
    return result


def references(x, do, cu_seqlens=None):
    o_ref, s_ref = recurrent_delta_rule_ref(**x, output_final_state=True, cu_seqlens=cu_seqlens)
    refs = {"o": o_ref, "final_state": s_ref}
    leaves = [x[n].detach().double().requires_grad_() for n in NAMES]
    delta_rule(*leaves, plan="eager", chunk_size=64, cu_seqlens=cu_seqlens)[0].backward(do.double())
    refs.update({f"d{n}": leaf.grad for n, leaf in zip(NAMES, leaves)})
    return refs


def recompiles(plan: Plan, H: int, D: int) -> dict:
    out = {}
    for B, T in ((8, 2048), (4, 4096), (2, 8192), (3, 3000)):
        x = make_inputs(B, T, H, D, dtype=torch.bfloat16, device="cuda")
        leaves = [x[n].requires_grad_() for n in NAMES]
        graphs, start = _graphs(), time.perf_counter()
        delta_rule(*leaves, plan=plan)[0].sum().backward()
        torch.cuda.synchronize()
        out[f"{B}x{T}"] = {"graphs": _graphs() - graphs, "first_call_s": round(time.perf_counter() - start, 2)}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4,4096,16,128")
    parser.add_argument("--plan", action="append", default=[])
    parser.add_argument("--keys", default="random")
    parser.add_argument("--fla", action="store_true", help="also fla-core's chunk_delta_rule")
    parser.add_argument("--recompiles", action="store_true")
    parser.add_argument("--packed-mean", type=int, default=0,
                        help="pack the B*T tokens into one row of random documents of this mean length (cu_seqlens)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    shape = Shape.parse(args.shape)
    profile_file = None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        profile_file = args.out / "profiles.txt"
    B, T, cu, cu_cpu = shape.B, shape.T, None, None
    if args.packed_mean:
        lengths = random_lengths(B * T, args.packed_mean, torch.Generator().manual_seed(0))
        B, T = 1, B * T
        cu_cpu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        cu = cu_cpu.to("cuda")
        print(f"packed: {len(lengths)} documents, mean {T / len(lengths):.0f} tokens", flush=True)
    x = make_inputs(B, T, shape.H, shape.K, shape.V, dtype=torch.bfloat16, device="cuda", keys=args.keys)
    do = torch.randn_like(x["v"])
    refs = references(x, do, cu)
    contenders = []
    for spec in args.plan or ["compiled"]:
        plan = plan_from_spec(spec)
        contenders.append((spec, lambda q, k, v, b, plan=plan: delta_rule(
            q, k, v, b, plan=plan, output_final_state=True, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu)))
    if args.fla:
        from fla.ops.delta_rule import chunk_delta_rule

        contenders.append(("fla chunk", lambda q, k, v, b: chunk_delta_rule(
            q, k, v, b, output_final_state=True, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu)))
    rows = []
    for name, forward in contenders:
        try:
            row = measure(name, forward, x, refs, do, profile_file)
        except Exception as e:  # one failing variant must not lose the others' numbers
            row = {"contender": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            if args.out:  # the whole story, for the ones that fail
                with open(args.out / "errors.log", "a") as f:
                    f.write(f"== {name} at {shape}\n{traceback.format_exc()}\n")
        row.update(shape=str(shape), keys=args.keys)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out / "profile_plan.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    if args.recompiles:
        r = recompiles(plan_from_spec(args.plan[0] if args.plan else "compiled"), shape.H, shape.K)
        print(json.dumps({"recompiles": r}), flush=True)
    print(f"\n{'contender':40s} {'fwd ms':>8s} {'fwd+bwd':>8s} {'GiB':>6s} {'first s':>8s} {'err o':>8s} {'err dk':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['contender']:40s} {r['error'][:80]}")
            continue
        print(f"{r['contender']:40s} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:8.3f} {r['peak_extra_gib']:6.2f} "
              f"{r['first_call_s']:8.1f} {r['err_o']:8.1e} {r['err_dk']:8.1e}")


if __name__ == "__main__":
    main()
