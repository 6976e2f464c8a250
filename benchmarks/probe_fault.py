"""Runs one Triton op many times on fresh random inputs and synchronizes after each launch, to pin a
CUDA fault on a launch configuration (run each configuration in its own process: a fault poisons
the CUDA context). Meant for `compute-sanitizer --tool memcheck python3 benchmarks/probe_fault.py`.

    python3 benchmarks/probe_fault.py --op solve_bwd --C 64 --K 32 --warps 8 --repeat 50
"""

from __future__ import annotations

import argparse

import torch

from deltaflex.kernels import solve


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--op", choices=["solve_fwd", "solve_bwd"], default="solve_bwd")
    p.add_argument("--C", type=int, default=64)
    p.add_argument("--K", type=int, default=32)
    p.add_argument("--N", type=int, default=2, help="chunks (B*H*N programs)")
    p.add_argument("--warps", type=int, default=0)
    p.add_argument("--stages", type=int, default=0)
    p.add_argument("--policy", default="bf16x3")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeat", type=int, default=20)
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    for _ in range(a.repeat):
        k = torch.randn(1, 1, a.N, a.C, a.K, device="cuda").to(dtype)
        beta = torch.rand(1, 1, a.N, a.C, device="cuda")
        t = solve.solve_fwd(k, beta, a.policy, dtype, a.warps, a.stages)
        if a.op == "solve_bwd":
            dt = torch.randn_like(t).tril(-1)
            solve.solve_bwd(k, beta, t, dt, a.policy, dtype, a.warps, a.stages)
        torch.cuda.synchronize()
    print(f"ok {a.op} C={a.C} K={a.K} warps={a.warps} policy={a.policy} dtype={a.dtype} x{a.repeat}")


if __name__ == "__main__":
    main()
