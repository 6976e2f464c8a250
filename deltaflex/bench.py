"""The kernel benchmark of docs/benchmarks.md: deltaflex plans against fla, transformers' torch
fallback (eager and compiled; `transformers_peer.py`) and causal SDPA, in one process on the same inputs.

For every shape: each contender's output is checked against the float64 oracle first, then forward
and forward+backward are timed (median of `triton.testing.do_bench` on CUDA, of a wall-clock loop on
CPU), and the peak memory above the inputs is read for forward+backward. Compiled plans also report
their first-call (compile) time per shape and how many graphs were compiled; `warm_start_seconds`
times a first call in a fresh process whose compile caches are already filled.

Used by `deltaflex bench` and `benchmarks/bench_delta_rule.py`.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .api import delta_rule
from .plan import Plan, plan_from_spec
from .reference import recurrent_delta_rule_ref
from .testing import make_inputs, relative_error

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Shape:
    B: int
    T: int
    H: int
    K: int
    V: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        """'B,T,H,K' or 'B,T,H,K,V'."""
        try:
            dims = [int(x) for x in text.split(",")]
        except ValueError:
            dims = []
        if len(dims) not in (4, 5) or min(dims) < 1:
            raise ValueError(f"a shape is B,T,H,K or B,T,H,K,V with positive integers, got {text!r}")
        return cls(*dims) if len(dims) == 5 else cls(*dims, dims[3])

    def __str__(self) -> str:
        tail = "" if self.V == self.K else f"x{self.V}"
        return f"{self.B}x{self.T}x{self.H}x{self.K}{tail}"


def paper_shapes() -> list[Shape]:
    """The paper's kernel benchmark: d_model 2048 and 16K tokens a batch, head dims 64/128/256."""
    return [Shape(B, T, 2048 // D, D, D) for D in (64, 128, 256) for B, T in ((8, 2048), (4, 4096), (2, 8192))]


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    forward: Forward
    computes_delta_rule: bool = True  # False for the attention baseline: timed, not checked
    compiles: bool = False
    first_call: str = ""  # what a first call does besides running (compiles, autotuning), for progress lines
    note: str = ""  # what runs, where the name does not say (peers)


def deltaflex_contender(plan: str | Plan, chunk_size: int | None = None, name: str | None = None) -> Contender:
    """delta_rule with `plan` (a Plan, or a name or spec for plan_from_spec); chunk_size None keeps
    the plan's own."""
    name = name or f"deltaflex[{plan}]"
    plan = _plan(plan)

    def forward(q, k, v, beta):
        return delta_rule(q, k, v, beta, chunk_size=chunk_size, plan=plan)[0]

    if not isinstance(plan, Plan):  # auto: the plan is chosen per shape
        return Contender(name, forward, compiles=True, first_call="the plan for the shape is chosen (and built)")
    builds = "triton" in plan.backends().values()
    first_call = ("torch.compile compiles the plan" + (", Triton its kernels" if builds else "") if plan.compile
                  else "Triton compiles the kernels" if builds else "")
    return Contender(name, forward, compiles=plan.compile or builds, first_call=first_call)


def _plan(plan: str | Plan) -> Plan | str:
    return plan_from_spec(plan) if isinstance(plan, str) and plan != "auto" else plan


def fla_contenders() -> list[Contender]:
    try:
        from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule
    except Exception:  # fla is an optional peer, absent on most machines
        return []
    autotunes = "fla autotunes its kernels: up to minutes a head dim"
    return [
        Contender("fla chunk", lambda q, k, v, beta: chunk_delta_rule(q, k, v, beta)[0], first_call=autotunes),
        Contender("fla recurrent", lambda q, k, v, beta: fused_recurrent_delta_rule(q, k, v, beta)[0],
                  first_call=autotunes),
    ]


def transformers_contenders() -> list[Contender]:
    """transformers' torch fallback (g = 0), eager and under torch.compile, where transformers is
    importable; the fallback itself runs even where fla is importable (transformers_peer.py)."""
    from . import transformers_peer

    try:
        transformers_peer.fallback()
    except ImportError:  # transformers is an optional peer
        return []
    note = " (fla bypassed)" if transformers_peer.fla_importable() else ""

    def eager(q, k, v, beta):
        return transformers_peer.delta_rule(q, k, v, beta)[0]

    def compiled(q, k, v, beta):
        return transformers_peer.delta_rule(q, k, v, beta, compiled=True)[0]

    about = transformers_peer.describe()
    return [Contender(f"transformers fallback{note}", eager, note=about),
            Contender(f"transformers fallback compiled{note}", compiled, compiles=True, note=about + ", torch.compile")]


def _sdpa(q, k, v, beta):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2)


def contenders(plans: list[str], device: torch.device, chunk_size: int | None = None, fla: bool = True,
               transformers: bool = True) -> list[Contender]:
    out = [deltaflex_contender(plan, chunk_size) for plan in plans]
    if fla and device.type == "cuda":
        out += fla_contenders()
    if transformers:
        out += transformers_contenders()
    return out + [Contender("sdpa causal", _sdpa, computes_delta_rule=False)]


def time_ms(fn: Callable[[], object], device: torch.device, grad_to_none=None) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    fn()
    samples, start = [], time.perf_counter()
    while len(samples) < 5 or (time.perf_counter() - start < 1.0 and len(samples) < 50):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        samples.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(samples)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _frames_ok() -> int:
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"]


def measure(contender: Contender, x: dict[str, torch.Tensor], o_ref: torch.Tensor | None, device) -> dict:
    """One contender at one shape: error, first-call time, forward and forward+backward times, memory."""
    leaves = [x[n].detach().requires_grad_() for n in ("q", "k", "v", "beta")]
    do = torch.randn_like(x["v"])
    row: dict = {"contender": contender.name, **({"note": contender.note} if contender.note else {})}

    def fwd():
        return contender.forward(*leaves)

    def fwd_bwd():
        contender.forward(*leaves).backward(do)

    frames, start = _frames_ok(), time.perf_counter()
    o = fwd()
    o.backward(do)
    _sync(device)
    row["first_call_s"] = time.perf_counter() - start
    row["graphs_compiled"] = _frames_ok() - frames
    if contender.computes_delta_rule and o_ref is not None:
        row["rel_err"] = relative_error(o, o_ref)
    with torch.no_grad():
        row["fwd_ms"] = time_ms(fwd, device)
    row["fwd_bwd_ms"] = time_ms(fwd_bwd, device, grad_to_none=leaves)
    if device.type == "cuda":
        row["peak_extra_gib"] = peak_extra_gib(fwd_bwd, device, leaves)
    return row


def starting(shape: Shape, contender: Contender) -> str:
    """The progress line before a contender's first call, which may take minutes."""
    what = contender.first_call or ("compiles" if contender.compiles else "")
    return f"{shape} {contender.name}: first call" + (f" ({what})..." if what else "...")


def finished(row: dict) -> str:
    """The progress line after a contender is measured."""
    if "error" in row:
        return f"{row['shape']} {row['contender']}: {row['error']}"
    err = f", err {row['rel_err']:.1e}" if "rel_err" in row else ""
    return (f"{row['shape']} {row['contender']}: fwd {row['fwd_ms']:.3f} ms, fwd+bwd {row['fwd_bwd_ms']:.3f} ms"
            f"{err}, first call {row['first_call_s']:.1f} s")


def peak_extra_gib(fn: Callable[[], object], device: torch.device, grad_to_none=()) -> float:
    """GiB that one call of fn allocates on the CUDA device beyond what is already there (the
    leaves' old gradients dropped first, so the new ones count)."""
    for t in grad_to_none:
        t.grad = None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def run_benchmark(
    shapes: list[Shape],
    plans: list[str],
    *,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    chunk_size: int | None = None,
    fla: bool = True,
    transformers: bool = True,
    check: bool = True,
    log: Callable[[str], None] = print,
    threads: int | None = None,
) -> list[dict]:
    """Every contender at every shape (`threads`: torch.set_num_threads for the CPU runs)."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device)
    rows = []
    for shape in shapes:
        x = make_inputs(shape.B, shape.T, shape.H, shape.K, shape.V, dtype=dtype, device=device)
        o_ref = recurrent_delta_rule_ref(**x)[0] if check else None
        for contender in contenders(plans, device, chunk_size, fla, transformers):
            log(starting(shape, contender))
            try:
                row = measure(contender, x, o_ref, device)
            except torch.OutOfMemoryError:
                row = {"contender": contender.name, "error": "out of memory"}
                torch.cuda.empty_cache()
            row.update(shape=str(shape), dtype=str(dtype).removeprefix("torch."))
            if device.type == "cpu":
                row["threads"] = torch.get_num_threads()
            rows.append(row)
            log(finished(row))
    add_fla_ratios(rows)
    return rows


def add_fla_ratios(rows: list[dict]) -> None:
    """fla_fwd_ratio / fla_fwd_bwd_ratio: fla chunk's time over this row's (> 1: faster than fla)."""
    fla = {r["shape"]: r for r in rows if r["contender"] == "fla chunk" and "fwd_ms" in r}
    for r in rows:
        base = fla.get(r["shape"])
        if base and "fwd_ms" in r:
            r["fla_fwd_ratio"] = base["fwd_ms"] / r["fwd_ms"]
            r["fla_fwd_bwd_ratio"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]


def recompile_check(plan: str, *, device: str, dtype: torch.dtype, H: int = 16, D: int = 128) -> dict:
    """Graphs compiled after the first call as T and B change (2048 -> 4096 -> 8192 -> 3000)."""
    counts = {}
    for B, T in ((8, 2048), (4, 4096), (2, 8192), (3, 3000)):
        shape = Shape(B, T, H, D, D)
        frames = _frames_ok()
        _first_call(shape, plan, dtype, device, None)
        counts[str(shape)] = _frames_ok() - frames
    return counts


def warm_start_seconds(shape: Shape, plan: str, dtype: torch.dtype, device: str, chunk_size: int | None = None) -> float:
    """First-call time (forward+backward) of `plan` in a new process that shares this one's compile
    caches (TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR), i.e. a warm start."""
    args = [sys.executable, "-m", "deltaflex.bench", "first-call", str(shape).replace("x", ","), plan,
            str(dtype).removeprefix("torch."), device, str(chunk_size or 0)]
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=os.environ.copy())
    return float(out.stdout.strip().splitlines()[-1])


def _first_call(shape: Shape, plan: str, dtype: torch.dtype, device: str, chunk_size: int | None) -> float:
    x = make_inputs(shape.B, shape.T, shape.H, shape.K, shape.V, dtype=dtype, device=device)
    leaves = [x[n].requires_grad_() for n in ("q", "k", "v", "beta")]
    start = time.perf_counter()
    delta_rule(*leaves, chunk_size=chunk_size, plan=_plan(plan))[0].sum().backward()
    _sync(torch.device(device))
    return time.perf_counter() - start


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "first-call":
    _shape, _spec, _dtype, _device, _chunk = sys.argv[2:]
    print(_first_call(Shape.parse(_shape), _spec, getattr(torch, _dtype), _device, int(_chunk) or None))
