"""The fused path inside a caller's torch.compile(fullgraph=True) against the float64 oracle, under
each backend (inductor traces into the fused kernels; aot_eager runs them as they are) with the fused
buffers poisoned (NaN) or not: which of the compiler, the buffers or the kernels a wrong result
comes from.

    python benchmarks/probes/fused_compile.py [B,T,H,K,V ...]
"""
import sys

import torch

from deltaflex import delta_rule
from deltaflex.fused import chunk as fused
from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import make_inputs, relative_error

real_empty = fused._empty


def nan_empty(*shape, dtype, like):
    return torch.full(shape, float("nan"), dtype=dtype, device=like.device)


def run(shape, backend, poison):
    B, T, H, K, V = shape
    fused._empty = nan_empty if poison else real_empty
    torch._dynamo.reset()
    x = make_inputs(B, T, H, K, V, dtype=torch.bfloat16, device="cuda")
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    fn = torch.compile(lambda q, k, v, beta: delta_rule(q, k, v, beta, plan="fused")[0] * 2, fullgraph=True,
                       backend=backend)
    o = fn(**leaves)
    o.sum().backward()
    refs = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    o_ref = recurrent_delta_rule_ref(**refs)[0] * 2
    o_ref.sum().backward()
    errors = {"o": relative_error(o, o_ref), **{f"d{n}": relative_error(leaves[n].grad, refs[n].grad) for n in leaves}}
    print(f"{shape} {backend:<9} poison {poison!s:<5} " + " ".join(f"{n} {e:.1e}" for n, e in errors.items()), flush=True)


if __name__ == "__main__":
    shapes = [tuple(map(int, s.split(","))) for s in sys.argv[1:]] or [(1, 40, 2, 16, 16), (1, 200, 2, 64, 64)]
    for shape in shapes:
        for backend in ("inductor", "aot_eager"):
            for poison in (True, False):
                try:
                    run(shape, backend, poison)
                except Exception as e:
                    print(f"{shape} {backend} poison {poison}: {type(e).__name__}: {str(e)[:200]}", flush=True)
