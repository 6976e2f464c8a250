"""Which fused launch faults: every launch of one fused forward and backward, synchronised and named
as it runs (run under compute-sanitizer for the faulting access)."""
import sys

import torch

from deltaflex.fused import chunk as fused
from deltaflex.testing import make_inputs

B, T, H, D = (int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "2,300,4,64").split(","))
x = make_inputs(B, T, H, D, dtype=torch.bfloat16, device="cuda")
q, k, v, beta = x["q"], x["k"], x["v"], x["beta"]
real = fused.launch


def launch(kernel, grid, *args, **kwargs):
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel)
    print("launch", name, grid, {n: kwargs[n] for n in kwargs if n.isupper() or n.startswith("num")}, flush=True)
    real(kernel, grid, *args, **kwargs)
    torch.cuda.synchronize()
    print("  ok", flush=True)


fused.launch = launch
o, final, t = fused.fused_forward(q, k, v, beta, None, D ** -0.5, 64)
print("o finite", bool(torch.isfinite(o).all()), flush=True)
do = torch.randn_like(o)
grads = fused.fused_backward(q, k, v, beta, t, None, do, None, D ** -0.5, 64)
print("grads finite", [bool(torch.isfinite(g).all()) for g in grads[:4]], flush=True)
