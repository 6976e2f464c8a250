"""A/B of the fused path's variants in one process: each variant (chunk.py switches and launch
parameters) checked against the float64 oracle, then timed forward and forward+backward with its
kernels' GPU times (torch.profiler), at every shape, variants interleaved shape by shape.

    python benchmarks/probes/fused_variants.py --shape 2,8192,16,128 --out $OUT --variants '[
      {"name": "base"},
      {"name": "dw2", "flags": {"WY_DW": {"128": 2}}},
      {"name": "dw2 w8", "flags": {"WY_DW": {"128": 2}}, "launch": {"128": {"wy_grads": {"num_warps": 8}}}}]'

A variant's flags set chunk.py attributes (a table keyed by head dim is updated); its launch entries
update fused.LAUNCH[D][kernel]. The check runs correlated keys with an initial state at (2, 300, 4, D)
for each timed head dim; a variant whose worst error exceeds --max-error is not timed. One JSON line
per figure on stdout and in $OUT/fused_variants.jsonl (a fault ends the process: what came before
stays); a table last.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from profile_kernels import apply_flags, contenders, kernel_table, timings  # noqa: E402

from deltaflex import delta_rule  # noqa: E402
from deltaflex.fused import chunk as fused  # noqa: E402
from deltaflex.reference import recurrent_delta_rule_ref  # noqa: E402
from deltaflex.testing import make_inputs, relative_error  # noqa: E402

NAMES = ("q", "k", "v", "beta", "initial_state")


def apply(variant, base_flags, base_launch):
    """chunk.py as the variant has it (from the committed values, not the last variant's)."""
    for name, value in {**base_flags, "LAUNCH": base_launch}.items():  # in place: other modules hold the tables
        if isinstance(value, dict):
            getattr(fused, name).clear()
            getattr(fused, name).update(copy.deepcopy(value))
        else:
            setattr(fused, name, value)
    apply_flags(variant.get("flags", {}))
    for d, kernels in variant.get("launch", {}).items():
        for kernel, cfg in kernels.items():
            fused.LAUNCH[int(d)][kernel] = {**fused.LAUNCH[int(d)][kernel], **cfg}


def worst_error(D: int) -> dict:
    torch.manual_seed(0)
    x = make_inputs(2, 300, 4, D, dtype=torch.bfloat16, device="cuda", keys="correlated", initial_state=True)
    leaves = [x[n].clone().requires_grad_() for n in NAMES]
    refs = [x[n].double().requires_grad_() for n in NAMES]
    do = torch.randn(2, 300, 4, D, device="cuda")
    o = delta_rule(*leaves[:4], initial_state=leaves[4], plan="fused")[0]
    o.backward(do.bfloat16())
    o_ref = recurrent_delta_rule_ref(*refs[:4], initial_state=refs[4])[0]
    o_ref.backward(do.double())
    return {"o": relative_error(o, o_ref), "grads": max(relative_error(a.grad, r.grad) for a, r in zip(leaves, refs))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", required=True, help="B,T,H,D")
    parser.add_argument("--variants", type=json.loads, required=True)
    parser.add_argument("--fla", action="store_true", help="fla's chunk_delta_rule timed at each shape too")
    parser.add_argument("--kernels", default="wy_grads,qk_grads",
                        help="kernels whose GPU times the table shows (substrings of their names)")
    parser.add_argument("--max-error", type=float, default=1e-2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        out = open(args.out / "fused_variants.jsonl", "a")

    def emit(row):
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    tables = {n: copy.deepcopy(getattr(fused, n)) for n in dir(fused)
              if n.isupper() and isinstance(getattr(fused, n), (bool, int, float, dict))}
    base_launch = tables.pop("LAUNCH")
    shapes = [tuple(map(int, s.split(","))) for s in args.shape]
    ours = contenders(False)["deltaflex fused"]
    rejected, summary = set(), []
    for variant in args.variants:  # the check, at every head dim timed
        apply(variant, tables, base_launch)
        for D in sorted({s[3] for s in shapes}):
            err = worst_error(D)
            emit({"variant": variant["name"], "check_dim": D, **err})
            if not max(err.values()) <= args.max_error:
                rejected.add(variant["name"])
            summary.append(f"check {variant['name']:<16} D={D:<4} o {err['o']:.2e} grads {err['grads']:.2e}")
    timings(shapes[0], "warm-up", ours)  # the first timings of a process run slow
    for shape in shapes:
        text = ",".join(map(str, shape))
        if args.fla:
            apply({}, tables, base_launch)
            row = {"shape": text, **timings(shape, "fla chunk", contenders(True)["fla chunk"])}
            emit(row)
            summary.append(f"{text:>15} {'fla':<16} fwd {row['fwd_ms']:.3f} fwd+bwd {row['fwd_bwd_ms']:.3f}")
        for variant in args.variants:
            if variant["name"] in rejected:
                continue
            apply(variant, tables, base_launch)
            row = {"shape": text, "variant": variant["name"], **timings(shape, variant["name"], ours)}
            emit(row)
            kernels = kernel_table(shape, variant["name"], ours, args.iters)
            for r in kernels:
                emit({"shape": text, "variant": variant["name"], **r})
            shown = " ".join(f"{r['kernel'][:12]} {r['ms']:.3f}" for r in kernels
                             if any(k in r["kernel"] for k in args.kernels.split(",")))
            total = sum(r["ms"] for r in kernels)
            summary.append(f"{text:>15} {variant['name']:<16} fwd {row['fwd_ms']:.3f} fwd+bwd {row['fwd_bwd_ms']:.3f} "
                           f"gpu {total:.3f} | {shown}")
    apply({}, tables, base_launch)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
