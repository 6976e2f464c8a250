"""Times the building blocks a compiled plan can be made of, at 4 x 4096 x 16 x 128 (GPU).

What a chunk step costs under the scan op versus an unrolled loop, what bf16 tensor-core
products with float32 results cost versus float32 ones, and the copy bandwidth: the numbers the
compiled plan's design rests on (docs/design-compiled.md).
"""

from __future__ import annotations

import json

import torch
import triton.testing

from deltaflex.chunk.state import affine_scan

dev = "cuda"
B, T, H, D, C = 4, 4096, 16, 128, 64
N = T // C
results = {}


def bench(name, fn):
    fn()
    results[name] = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


x = torch.randn(B * T * H * D * 8, device=dev)
bench("copy_1GiB_fp32", lambda: x.clone())  # 1 GiB read + 1 GiB written

kc = torch.randn(B * H * N, C, D, device=dev, dtype=torch.bfloat16)
t32 = torch.randn(B * H * N, C, C, device=dev)
bench("kkt_bf16_out_bf16", lambda: kc @ kc.transpose(-1, -2))
try:
    bench("kkt_bf16_out_fp32", lambda: torch.bmm(kc, kc.transpose(-1, -2), out_dtype=torch.float32))
except Exception as e:  # out_dtype needs a recent torch
    results["kkt_bf16_out_fp32"] = repr(e)[:120]
bench("wy_fp32", lambda: t32 @ kc.float())
bench("wy_bf16", lambda: t32.bfloat16() @ kc)

p = 0.01 * torch.randn(B, H, N, D, D, device=dev)
r = torch.randn(B, H, N, D, D, device=dev)
s0 = torch.zeros(B, H, D, D, device=dev)
bench("affine_scan_loop_eager_64_steps", lambda: affine_scan(p, r, s0, impl="loop"))
for impl in ("scan", "loop"):
    f = torch.compile(lambda p, r, s: affine_scan(p, r, s, impl=impl), fullgraph=True)
    bench(f"affine_scan_{impl}_compiled_64_steps", lambda: f(p, r, s0))
f = torch.compile(lambda p, r, s: affine_scan(p, r, s, impl="loop"), fullgraph=True, mode="reduce-overhead")
bench("affine_scan_loop_cudagraph_64_steps", lambda: f(p, r, s0))

for name, value in results.items():
    print(f"{name:40s} {value if isinstance(value, str) else f'{value:.4f} ms'}")
print(json.dumps(results))
