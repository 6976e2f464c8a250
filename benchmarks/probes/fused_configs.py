"""Which launch configurations of one fused kernel compute right on this GPU (Triton has miscompiled
narrow bf16 products at 8 warps on the H200: a fault; at 4: silently wrong). Each configuration runs
in a process of its own (a fault ends its CUDA context), forward and backward against the float64
oracle at three head dims.

    python benchmarks/probes/fused_configs.py grads 'BK=32,BV=32,num_warps=8' 'BK=64,BV=64,num_warps=4' ...
"""
import json
import subprocess
import sys

CHILD = r"""
import json, sys, torch
from deltaflex import delta_rule
from deltaflex.fused import chunk as fused
from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import make_inputs, relative_error
kernel, cfg = sys.argv[1], json.loads(sys.argv[2])
for table in fused.LAUNCH.values():
    table[kernel] = {**table[kernel], **cfg}
worst = 0.0
for B, T, H, D in ((2, 300, 4, 64), (1, 200, 2, 128), (1, 150, 1, 256), (1, 100, 2, 100)):
    x = make_inputs(B, T, H, D, dtype=torch.bfloat16, device="cuda", keys="correlated")
    leaves = [x[n].clone().requires_grad_() for n in ("q", "k", "v", "beta")]
    refs = [x[n].double().requires_grad_() for n in ("q", "k", "v", "beta")]
    do = torch.randn(B, T, H, D, device="cuda")
    delta_rule(*leaves, plan="fused")[0].backward(do.bfloat16())
    recurrent_delta_rule_ref(*refs)[0].backward(do.double())
    worst = max([worst] + [relative_error(a.grad, r.grad) for a, r in zip(leaves, refs)])
print(json.dumps({"worst_grad_error": worst}))
"""


def parse(text):
    out = {}
    for item in text.split(","):
        name, value = item.split("=")
        out[name] = int(value)
    return out


if __name__ == "__main__":
    kernel = sys.argv[1]
    for text in sys.argv[2:]:
        r = subprocess.run([sys.executable, "-c", CHILD, kernel, json.dumps(parse(text))], capture_output=True,
                           text=True, timeout=300)
        lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
        verdict = lines[-1] if lines else "FAILED: " + (r.stderr.strip().splitlines() or ["?"])[-1][:160]
        print(f"{kernel} {text}: {verdict}", flush=True)
