"""Which launch configurations of one fused kernel, or which of chunk.py's switches, compute right on
this GPU (Triton has miscompiled narrow bf16 products on the H200: at 8 warps a fault; at 4 silently
wrong; 32-wide value blocks in the state pass that writes the output: NaN). Each configuration runs in
a process of its own (a fault ends its CUDA context), forward and backward against the float64 oracle
at head dims 64, 128, 256 and 100 (or --dims; 32: tests/fused's narrow fp16 case), on correlated keys
with an initial state; the worst error of o and of the gradients (the initial state's included) is
printed (bf16's own rounding is about 3e-3; inf: non-finite).

    python benchmarks/probes/fused_configs.py grads_kernel 'BK=32,BV=32,num_warps=8' 'BK=64,BV=64,num_warps=4'
    python benchmarks/probes/fused_configs.py state_out 'num_stages=3' --dims 64
    python benchmarks/probes/fused_configs.py none - --flags '{"NARROW_STATE_WHEN_FEW": true}'
    python benchmarks/probes/fused_configs.py none - --flags '{"NARROW_WARPS": 4}' --dims 32 --dtype float16 --seeds 20
    python benchmarks/probes/fused_configs.py state_out 'BV=64,num_stages=1,num_warps=8' --dims 256 \
        --flags '{"OUTPUT_IN_STATE": {"256": true}}'
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[7])  # benchmarks/
from profile_kernels import apply_flags
from deltaflex import delta_rule
from deltaflex.fused import chunk as fused
from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import make_inputs, relative_error
kernel, cfg, flags, dims = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
dtype, seeds = getattr(torch, sys.argv[5]), int(sys.argv[6])
if kernel != "none":
    for table in fused.LAUNCH.values():
        table[kernel] = {**table[kernel], **cfg}
if kernel == "state_out":  # the forward's pass writes the output at these small shapes too
    fused.OUTPUT_STEP_MS = dict.fromkeys(fused.OUTPUT_STEP_MS, 0.0)
apply_flags(flags)
worst = {"o": 0.0, "grads": 0.0}
names = ("q", "k", "v", "beta", "initial_state")
for B, T, H, K, V in ((2, 300, 4, 64, 64), (1, 200, 2, 128, 128), (1, 150, 1, 256, 256), (1, 100, 2, 100, 100),
                      (2, 70, 2, 32, 24)):  # the last: tests/fused's fp16 case (narrow blocks: NARROW_WARPS)
    if K not in dims:
        continue
    for seed in range(seeds):
        torch.manual_seed(seed)
        x = make_inputs(B, T, H, K, V, dtype=dtype, device="cuda", keys="correlated", initial_state=True)
        leaves = [x[n].clone().requires_grad_() for n in names]
        refs = [x[n].double().requires_grad_() for n in names]
        do = torch.randn(B, T, H, V, device="cuda")
        o = delta_rule(*leaves[:4], initial_state=leaves[4], plan="fused")[0]
        o.backward(do.to(dtype))
        o_ref = recurrent_delta_rule_ref(*refs[:4], initial_state=refs[4])[0]
        o_ref.backward(do.double())
        worst["o"] = max(worst["o"], relative_error(o, o_ref))
        worst["grads"] = max([worst["grads"]] + [relative_error(a.grad, r.grad) for a, r in zip(leaves, refs)])
print(json.dumps(worst))
"""


def parse(text):
    out = {}
    for item in filter(None, text.split(",")):
        name, value = item.split("=")
        out[name] = int(value)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("kernel", help="fused.LAUNCH's kernel key (state_out, qk_grads, ...) or none")
    parser.add_argument("configs", nargs="+", help="'NAME=VALUE,...' each ('-': the committed one)")
    parser.add_argument("--flags", default="{}", help="chunk.py module attributes to set, JSON")
    parser.add_argument("--dims", default="64,128,256,100", help="key head dims of the cases (32: K = 32, V = 24)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--seeds", type=int, default=1, help="inputs drawn from this many seeds a case")
    args = parser.parse_args()
    dims = json.dumps([int(d) for d in args.dims.split(",")])
    for text in args.configs:
        cfg = json.dumps(parse("" if text == "-" else text))
        r = subprocess.run([sys.executable, "-c", CHILD, args.kernel, cfg, args.flags, dims, args.dtype,
                            str(args.seeds), str(Path(__file__).resolve().parents[1])],
                           capture_output=True, text=True, timeout=300)
        lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
        verdict = lines[-1] if lines else "FAILED: " + (r.stderr.strip().splitlines() or ["?"])[-1][:160]
        print(f"{args.kernel} {text} {args.flags}: {verdict}", flush=True)
