"""Registers, spills and shared memory of every Triton kernel as launched, compiled for a GPU
target on the CPU (no GPU needed): what decides the launch parameters in deltaflex/kernels.

    python benchmarks/kernel_resources.py --dims 64,128,256 --chunk-sizes 64,128 --policy bf16x3

Each op runs on meta tensors with its launches recorded instead of run; each recorded kernel is then
compiled for the target (sm_90 by default) with the launch's constexprs, and `cuobjdump` reports
its resources. A kernel that fails to compile, spills, or needs more shared memory than the target
has (227 KiB on sm_90) is flagged. Run without TRITON_INTERPRET.

With --mutations it checks instead what torch.compile believes each kernel writes (Inductor's
analysis of the kernel's IR): every output of the op, never one of its inputs, and never a buffer
that the launch also takes in another argument (compiled, each written argument is a clone of its own). Where that analysis
fails, Inductor silently assumes every argument is written and clones them all (with torch 2.11
that broke compiling graphs with Triton plans); where it missed a write, a compiled graph could
reorder or reuse the buffer.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget

# How a Python float argument is typed: Triton itself says fp32; torch.compile (Inductor, torch 2.11)
# passes fp64, which every kernel must take too (--float-arg fp64).
FLOAT_ARG = "fp32"
SMEM_LIMIT = {90: 232448, 80: 166912}
_TRITON_DTYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
                  torch.int64: "*i64"}


class _OutputInState:
    """The fused forward with its output from the state pass, whatever the shape (chunk.py chooses it
    by a cost model that at this tool's tiny shapes says no)."""

    @staticmethod
    def launcher(*args, **kwargs):
        from deltaflex.fused import chunk as fused

        saved, fused.OUTPUT_STEP_MS = fused.OUTPUT_STEP_MS, dict.fromkeys(fused.OUTPUT_STEP_MS, 0.0)
        try:
            return fused.fused_forward.launcher(*args, **kwargs)
        finally:
            fused.OUTPUT_STEP_MS = saved


def op_calls(K: int, V: int, C: int, policy: str, low: torch.dtype, layout: str = "chunk"):
    """(name, op, args, kwargs) for every op at one shape, on meta tensors; `layout` "tokens": the
    inputs (q, k, v, beta, dO) in the token layout [B, T, H, D] with a ragged last chunk; "packed":
    packed sequences in it, placed by a chunk table."""
    from deltaflex.fused import chunk as fused
    from deltaflex.kernels import output, recurrent_step, solve, state, wy

    B, H, N = 1, 1, 2

    def t(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    tt, w, u, st, s0 = t(B, H, N, C, C), t(B, H, N, C, K), t(B, H, N, C, V), t(B, H, N, K, V), t(B, H, K, V)
    e = torch.empty(0, dtype=torch.int32, device="meta")  # no packed sequences
    segments = (e, e, e)
    if layout in ("tokens", "packed"):
        T = N * C - 3
        q, k, v, do, beta = t(B, T, H, K, dtype=low), t(B, T, H, K, dtype=low), t(B, T, H, V, dtype=low), t(
            B, T, H, V, dtype=low), t(B, T, H)
        kw = {"chunk_size": C}
        if layout == "packed":
            kw["chunk_table"] = t(N, 2, dtype=torch.int64)
            segments = tuple(t(N, dtype=torch.int32) for _ in range(3))
    else:
        q, k, v, do, beta = t(B, H, N, C, K, dtype=low), t(B, H, N, C, K, dtype=low), t(B, H, N, C, V, dtype=low), t(
            B, H, N, C, V, dtype=low), t(B, H, N, C)
        kw = {}
    p = (policy, low)
    calls = [
        ("solve_fwd", solve.solve_fwd, (k, beta, *p)),
        ("solve_bwd", solve.solve_bwd, (k, beta, tt, tt, *p)),
        ("wy_fwd", wy.wy_fwd, (tt, k, v, beta, *p)),
        ("wy_bwd", wy.wy_bwd, (tt, k, v, beta, w, u, *p)),
        ("state_fwd", state.state_fwd, (k, w, u, s0, *segments, *p)),
        ("state_bwd", state.state_bwd, (q, k, w, u, st, do, u, s0, *segments, 0.5, *p)),
        ("output_fwd", output.output_fwd, (q, k, u, st, 0.5, *p)),
        ("output_bwd", output.output_bwd, (q, k, u, st, do, 0.5, *p)),
    ]
    calls = [(name, op, args, kw) for name, op, args in calls]
    if layout in ("tokens", "packed") and C in fused.CHUNK_SIZES:  # the fused path reads the caller's layout only
        tf = t(B, T, H, C)
        pk = {"chunks": t(N, 2, dtype=torch.int32), "seqs": t(1, 4, dtype=torch.int64)} if layout == "packed" else {}
        seg = {"segment_table": t(N, 4, dtype=torch.int64), "segment_of_sequence": t(1, 2, dtype=torch.int64)}
        calls += [("fused_fwd", fused.fused_forward, (q, k, v, beta.to(low), s0, 0.5, C), pk),
                  ("fused_fwd_out", _OutputInState, (q, k, v, beta.to(low), s0, 0.5, C), pk),
                  ("fused_fwd_seg", fused.fused_forward, (q, k, v, beta.to(low), s0, 0.5, C),
                   {**(pk or {"chunks": None, "seqs": None}), "segment": 2, **(seg if pk else {})}),
                  ("fused_bwd", fused.fused_backward, (q, k, v, beta.to(low), tf, s0, do, s0, 0.5, C), pk)]
    if layout == "chunk":  # decoding reads tokens [B, T, H, D] (T = 2) whatever the chunk stages' layout
        calls.append(("recurrent_step", recurrent_step.recurrent_step,
                      (t(B, 2, H, K, dtype=low), t(B, 2, H, K, dtype=low), t(B, 2, H, V, dtype=low),
                       t(B, 2, H, dtype=low), s0, 0.5, False), {}))
    return calls


def recorded_launches(op, args, outputs: list | None = None, kwargs: dict | None = None):
    """The (kernel, args, kwargs) an op launches, recorded instead of run (what it returns appended to
    `outputs`)."""
    from deltaflex import kernels
    from deltaflex.fused import chunk as fused
    from deltaflex.fused import segments

    calls = []
    modules = (kernels.common, kernels.solve, kernels.wy, kernels.state, kernels.output, kernels.recurrent_step, fused,
               segments)
    saved = [m.launch for m in modules]
    for m in modules:
        m.launch = lambda kernel, grid, *a, **kw: calls.append((kernel, a, kw))
    try:
        result = op.launcher(*args, **(kwargs or {}))
        if outputs is not None:
            outputs.append(result)
    finally:
        for m, f in zip(modules, saved):
            m.launch = f
    return calls


def compile_and_measure(kernel, args, kwargs, capability: int) -> dict:
    options = {n: kwargs[n] for n in ("num_warps", "num_stages") if n in kwargs}
    constexprs = {n: v for n, v in kwargs.items() if n not in options}
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if kernel.params[i].is_constexpr and name not in constexprs:  # passed positionally, or its default
            constexprs[name] = args[i] if i < len(args) else kernel.params[i].default
        if i < len(args) and args[i] is None and name not in constexprs:  # an untouched pointer: a constant
            constexprs[name] = None
        if name in constexprs:
            signature[name] = "constexpr"
        elif i < len(args):
            a = args[i]
            if isinstance(a, torch.Tensor):
                signature[name] = _TRITON_DTYPES[a.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]  # as the launcher specialises aligned pointers
            else:
                signature[name] = FLOAT_ARG if isinstance(a, float) else "i32"
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return {"registers": int(m.group(1)), "spill_bytes": int(m.group(2)), "shared": compiled.metadata.shared,
            **options, **{n: constexprs[n] for n in ("BK", "BV") if n in constexprs}}


def inductor_writes(kernel, args, kwargs, capability: int) -> list:
    """The tensors of one launch that Inductor's analysis of the kernel's IR says it writes (traced for
    the chosen GPU, made the active driver's target for this process)."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    class _Target:
        def get_current_target(self):
            return GPUTarget("cuda", capability, 32)

    triton.runtime.driver.set_active(_Target())
    named = dict(zip(kernel.arg_names, args))
    # Inductor hands the analysis real tensors in place of fake ones, and Python floats as it got them
    real = {n: torch.empty(2, dtype=a.dtype) if isinstance(a, torch.Tensor) else a for n, a in named.items()}
    launch_args = {n: v for n, v in kwargs.items() if n not in ("num_warps", "num_stages")}
    if hasattr(wrap, "identify_mutated_tensors"):  # torch < 2.13
        names = wrap.identify_mutated_tensors(kernel, {**real, **launch_args}, {})
    else:
        names = [d.name for d in wrap.identify_accessed_tensors(kernel, {**real, **launch_args}, {}).read_writes.writes]
    return [named[n] for n in names if n in named and isinstance(named[n], torch.Tensor)]


def check_writes(op, op_args, op_kwargs, capability: int) -> list[str]:
    """What is wrong with Inductor's view of an op's writes: an input written, an output not."""
    outputs = []
    calls = recorded_launches(op, op_args, outputs, op_kwargs)
    written, aliased = [], []
    for kernel, a, kw in calls:
        writes = inductor_writes(kernel, a, kw, capability)
        written += writes
        # Under torch.compile each argument the analysis counts as written is cloned on its own: a tensor
        # passed in two such places gets two clones, and the one the kernel did not write wins
        tensors = [x for x in a if isinstance(x, torch.Tensor)]
        aliased += [f"{kernel.fn.__name__}: one buffer in two arguments, written" for w in writes
                    if sum(x is w for x in tensors) > 1]
    aliased = sorted(set(aliased))
    returned = outputs[0] if isinstance(outputs[0], (tuple, list)) else (outputs[0],)
    # Packed sequences' index arrays (int32/int64) address the per-sequence states a pass stores to, so
    # the analysis counts them as written: Inductor then copies them (a few ints), which is harmless.
    problems = [f"input {i} written" for i, t in enumerate(op_args)
                if any(t is w for w in written) and t.is_floating_point()]
    return problems + aliased + [f"output {i} not written" for i, t in enumerate(returned)
                                 if not any(t is w for w in written)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="64,128,256", help="head dims (K = V)")
    parser.add_argument("--chunk-sizes", default="64")
    parser.add_argument("--policy", default="bf16x3", choices=["bf16x3", "bf16", "fp32"])
    parser.add_argument("--float-arg", default="fp32", choices=["fp32", "fp64"],
                        help="type of float arguments (scale): fp64 is what torch.compile passes")
    parser.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    parser.add_argument("--layouts", default="chunk,tokens,packed",
                        help="where the ops read their inputs: chunk (padded chunk layout), tokens (the caller's), "
                             "packed (packed sequences in the caller's)")
    parser.add_argument("--capability", type=int, default=90)
    parser.add_argument("--mutations", action="store_true",
                        help="check torch.compile's view of what each kernel writes instead")
    args = parser.parse_args()
    global FLOAT_ARG
    FLOAT_ARG = args.float_arg
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles the kernels")
    low = torch.float32 if args.policy == "fp32" else torch.bfloat16
    bad = 0
    calls = [(C, D, layout, call) for C in map(int, args.chunk_sizes.split(",")) for D in map(int, args.dims.split(","))
             for layout in args.layouts.split(",") for call in op_calls(D, D, C, args.policy, low, layout)]
    for C, D, layout, (name, op, op_args, op_kwargs) in calls:
        if args.ops and name not in args.ops.split(","):
            continue
        where = f"C={C:<4}D={D:<4}{layout[0]} {name:<18}"
        if args.mutations:
            problems = check_writes(op, op_args, op_kwargs, args.capability)
            bad += bool(problems)
            print(where + ("; ".join(problems) + " FAILED" if problems else "ok"), flush=True)
            continue
        for kernel, a, kw in recorded_launches(op, op_args, kwargs=op_kwargs):
            try:
                r = compile_and_measure(kernel, a, kw, args.capability)
                flags = [f for f, on in (("SPILLS", r["spill_bytes"] > 0),
                                         ("SHARED>LIMIT", r["shared"] > SMEM_LIMIT.get(args.capability, 1 << 30)))
                         if on]
            except Exception as e:  # a kernel that does not compile is what this tool is for
                r, flags = {"error": f"{type(e).__name__}: {str(e)[:300]}"}, ["FAILED"]
            bad += bool(flags)
            print(f"{where}{kernel.fn.__name__ if hasattr(kernel, 'fn') else kernel.__name__:<22}{r} {' '.join(flags)}",
                  flush=True)
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
