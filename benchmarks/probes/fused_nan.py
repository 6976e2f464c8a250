"""Which fused launch leaves an element unwritten or computes a NaN: every buffer starts as NaN (as
tests/fused poisons them) and after each launch every tensor argument is checked; then o and the
gradients against the float64 oracle. Cases: dtype,B,T,H,K,V[,s0] (default: the narrow cases that
failed on the H200), each also with every kernel at WARPS warps (narrow head dims launch with
chunk.NARROW_WARPS).

    python benchmarks/probes/fused_nan.py [--warps 2,4] [bf16,1,40,2,16,16 fp16,2,70,2,32,24,s0 ...]
"""
import argparse

import torch

from deltaflex import delta_rule
from deltaflex.fused import chunk as fused
from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import make_inputs, relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: run with TRITON_INTERPRET=1
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def poisoned(*shape, dtype, like):
    return torch.full(shape, float("nan"), dtype=dtype, device=like.device)


def checked_launch(kernel, grid, *args, **kwargs):
    name = kernel.fn.__name__
    fused_launch(kernel, grid, *args, **kwargs)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    bad = [f"arg{i} {tuple(a.shape)} {int(torch.isnan(a).sum())} NaN" for i, a in enumerate(args)
           if isinstance(a, torch.Tensor) and a.is_floating_point() and torch.isnan(a).any()]
    print(f"  {name:<20} {grid} " + ("; ".join(bad) if bad else "no NaN"), flush=True)


def run(case: str, warps):
    dtype, *dims = case.split(",")
    s0 = dims[-1] == "s0"
    B, T, H, K, V = map(int, dims[:5])
    saved = fused.NARROW_WARPS
    if warps:
        fused.NARROW_WARPS = warps
    print(f"{case} (narrow warps {fused.NARROW_WARPS})", flush=True)
    x = make_inputs(B, T, H, K, V, dtype=DTYPES[dtype], device=DEVICE, keys="correlated", initial_state=s0)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, final = delta_rule(**leaves, plan="fused", output_final_state=True)
    do = torch.randn_like(o)
    o.backward(do)
    refs = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    o_ref, final_ref = recurrent_delta_rule_ref(**refs, output_final_state=True)
    o_ref.backward(do.double())
    errors = {"o": relative_error(o, o_ref), "final": relative_error(final, final_ref)}
    errors.update({f"d{n}": relative_error(leaves[n].grad, refs[n].grad) for n in leaves})
    print("  errors " + " ".join(f"{n} {e:.1e}" for n, e in errors.items()), flush=True)
    fused.NARROW_WARPS = saved


fused_launch = fused.launch
if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("cases", nargs="*", default=["bf16,1,40,2,16,16", "fp16,2,70,2,32,24,s0", "bf16,2,70,2,32,24,s0",
                                                     "fp32,2,70,2,32,24,s0"])
    parser.add_argument("--warps", default="0,4", help="narrow launches' warps to try (0: the default)")
    args = parser.parse_args()
    fused._empty, fused.launch = poisoned, checked_launch
    for case in args.cases:
        for w in map(int, args.warps.split(",")):
            try:
                run(case, w)
            except Exception as e:  # a fault ends the CUDA context: report and stop
                print(f"  {type(e).__name__}: {str(e)[:200]}", flush=True)
                raise SystemExit(1)
