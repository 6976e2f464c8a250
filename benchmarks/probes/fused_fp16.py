"""The fp16 failure of tests/fused (2 x 70 x 2, K = 32, V = 24, correlated keys): is prepare_fwd's T
wrong on these inputs everywhere (an overflow of the algorithm in fp16), or only in the GPU's build?
Per seed: whether T (and o) came out finite, the largest |T| of the float64 inverse of (I + A) from
the same fp16 keys and beta, the largest |T| and the worst relative error of the finite ones, and the
first non-finite chunk. The inputs of the non-finite seeds are saved (torch.save, --save), to be
replayed where the kernels run another way (the interpreter: TRITON_INTERPRET=1 ... --load FILE).

    python benchmarks/probes/fused_fp16.py --seeds 20 --save $OUT/fp16
    TRITON_INTERPRET=1 python benchmarks/probes/fused_fp16.py --load $OUT/fp16/seed3.pt

Only the first fp16 call after a float32 one went wrong (eleventh session): --dirty runs a matrix
product before every seed that leaves NaN (or float32 data, or finite fp16) in the SMs' shared memory,
which a kernel reading shared memory it never wrote would then see; --poison-value marks buffers with a
finite value instead of NaN, so that T's entries still holding it (never written) tell apart from
computed non-finite ones; --prepare-stages, --prepare-warps rebuild prepare_fwd another way.

    python benchmarks/probes/fused_fp16.py --seeds 10 --dirty nan --poison-value 7777
"""
import argparse
from pathlib import Path

import torch

from deltaflex.fused import chunk as fused
from deltaflex.testing import make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (2, 70, 2, 32, 24)
C = 64


def inverse_ref(k, beta):
    """float64 (I + tril(diag(beta) K K^T, -1))^-1 per chunk: [B, T, H, C] as fused_forward writes T."""
    B, T, H, K = k.shape
    k, beta = k.double(), beta.double()
    out = torch.zeros(B, T, H, C, dtype=torch.float64, device=k.device)
    for t0 in range(0, T, C):
        n = min(C, T - t0)
        kc, bc = k[:, t0:t0 + n].transpose(1, 2), beta[:, t0:t0 + n].transpose(1, 2)  # [B, H, n, K], [B, H, n]
        a = torch.tril(bc[..., None] * kc @ kc.transpose(-1, -2), -1)
        inv = torch.linalg.inv(torch.eye(n, dtype=torch.float64, device=k.device) + a)
        out[:, t0:t0 + n, :, :n] = inv.transpose(1, 2)
    return out


def dirty_shared_memory(kind: str):
    """A product on every SM whose tiles pass through shared memory: NaN fp16, float32 (as a float32
    run before leaves it), or finite fp16 (the control)."""
    if kind == "none":
        return
    dtype = torch.float32 if kind == "float32" else torch.float16
    a = torch.randn(4096, 4096, device=DEVICE, dtype=dtype)
    if kind == "nan":
        a.fill_(float("nan"))
    allow, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    (a @ a).sum().item()
    torch.backends.cuda.matmul.allow_tf32 = allow


def report(name, x, dirty="none", sentinel=None):
    B, T, H, K, V = SHAPE
    dirty_shared_memory(dirty)
    o, final, t = fused.fused_forward(x["q"], x["k"], x["v"], x["beta"], x["initial_state"], K ** -0.5, C)
    ref = inverse_ref(x["k"], x["beta"])
    t, ref = t.double().cpu(), ref.cpu()
    finite = torch.isfinite(t)
    bad = (~finite).nonzero()
    first = "-" if bad.numel() == 0 else f"b{bad[0, 0]} chunk {bad[0, 1] // C} h{bad[0, 2]} row {bad[0, 1] % C}"
    err = ((t - ref).where(finite, 0).norm() / ref.where(finite, 0).norm()).item()
    unwritten = "" if sentinel is None else f"unwritten {int((t == sentinel).sum())} "
    print(f"{name:>12} {unwritten}T finite {bool(finite.all())!s:<5} o finite {bool(torch.isfinite(o).all())!s:<5} "
          f"max|T ref| {ref.abs().max().item():9.3g} max|T| {t.where(finite, 0).abs().max().item():9.3g} "
          f"err {err:.2e} first non-finite {first}", flush=True)
    return bool(finite.all()) and bool(torch.isfinite(o).all())


def _prepare_opts(stages, warps) -> dict:
    """prepare_fwd's launch keywords at this case's head dims, with stages and warps replaced (warps
    also past chunk.py's NARROW_WARPS, which the case's narrow blocks would otherwise impose)."""
    real = fused._opts

    def opts(kernel, K, V):
        o = real(kernel, K, V)
        if kernel == "prepare_fwd":
            o.update({n: v for n, v in (("num_stages", stages), ("num_warps", warps)) if v})
        return o

    fused._opts = opts
    return opts("prepare_fwd", SHAPE[3], SHAPE[4])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--save", type=Path, help="a folder for the non-finite seeds' inputs")
    parser.add_argument("--load", type=Path, action="append", default=[], help="replay saved inputs instead")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                        help="the dtype the inputs run in (saved fp16 inputs cast: the same keys in bf16)")
    parser.add_argument("--warps", type=int, help="chunk.NARROW_WARPS for this run")
    parser.add_argument("--first", choices=["float32", "bfloat16"],
                        help="run the case once in this dtype first, in the same process (as the test does float32)")
    parser.add_argument("--poison", action="store_true", help="every buffer starts as NaN (as tests/fused has it)")
    parser.add_argument("--poison-value", type=float, help="every buffer starts as this (finite: unwritten entries show)")
    parser.add_argument("--dirty", default="none", choices=["none", "nan", "float32", "finite"],
                        help="before every case, a product leaving this in shared memory")
    parser.add_argument("--prepare-stages", type=int, help="prepare_fwd's num_stages for this run")
    parser.add_argument("--prepare-warps", type=int, help="prepare_fwd's num_warps for this run")
    args = parser.parse_args()
    poison = float("nan") if args.poison else args.poison_value
    if poison is not None:
        fused._empty = lambda *shape, dtype, like: torch.full(shape, poison, dtype=dtype, device=like.device)
    sentinel = args.poison_value
    if args.prepare_stages or args.prepare_warps:
        opts = _prepare_opts(args.prepare_stages, args.prepare_warps)
        print(f"prepare_fwd launched with {opts}")
    if args.warps:
        fused.NARROW_WARPS = args.warps
    dtype = getattr(torch, args.dtype)
    cast = lambda x: {n: (t if n == "initial_state" else t.to(dtype)).to(DEVICE) for n, t in x.items()}  # noqa: E731
    if args.load:
        for path in args.load:
            report(path.stem, cast(torch.load(path)), args.dirty, sentinel)
        return
    if args.first:
        torch.manual_seed(1000)
        report(args.first, make_inputs(*SHAPE, dtype=getattr(torch, args.first), device=DEVICE, keys="correlated",
                                       initial_state=True), "none", sentinel)
    failing = 0
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        x = make_inputs(*SHAPE, dtype=torch.float16, device=DEVICE, keys="correlated", initial_state=True)
        ok = report(f"seed {seed}", cast(x), args.dirty, sentinel)
        if not ok:
            failing += 1
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                torch.save({n: t.cpu() for n, t in x.items()}, args.save / f"seed{seed}.pt")
    print(f"{failing} of {args.seeds} seeds non-finite ({args.dtype}, NARROW_WARPS {fused.NARROW_WARPS}"
          f"{', poisoned' if poison is not None else ''}, dirty {args.dirty}"
          f"{', first ' + args.first if args.first else ''})")


if __name__ == "__main__":
    main()
