"""Issue 6's GPU measurements in one call: the decode step and the DeltaNet layer against fla.

    python benchmarks/bench_layer.py --out results/             # H200: the issue's sizes
    python benchmarks/bench_layer.py --quick --out /tmp/smoke   # CPU smoke run at a tiny size

Parts (--parts, default all, in this order):
  checks        before any timing, against float64: the layer's output and the gradients of its input
                and every parameter at a short length (deltaflex's layer with bf16 weights, and fla's
                `DeltaNet` with the same weights); prefill + compiled one-token steps against the
                whole-sequence forward.
  decode        one decode step at B in --decode-batches, hidden 2048 / head dim 128: deltaflex
                `delta_rule_step` (called; replayed as a CUDA graph) against fla's
                `fused_recurrent_delta_rule` (the same two ways), outputs and states checked against
                the float64 oracle; GPU us per call by `triton.testing.do_bench` (L2 flushed between
                calls: a decode step in a real model finds its state out of cache) and host-timed us
                per call in a back-to-back loop (what a decode loop sees, launch overheads included).
  layer_decode  one token through the whole layer, compiled and replayed as a CUDA graph that updates
                the cache in place, checked against the eager layer.
  layer         forward and forward+backward at --layer-shape: deltaflex's layer (its delta rule on
                --plan, default None = "auto": the tuned plan, else "triton" on CUDA), the same under torch.compile, fla's
                `DeltaNet` with the same weights; output checked against the float64 reference layer
                (and the compiled layer's input gradient against the eager layer's); tokens/s, peak
                extra memory, first-call time.
Writes <out>/bench_layer.json after every measurement (a run cut short keeps what it had); prints a
short table last.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from deltaflex import DeltaNet, DeltaNetCache, Plan, delta_rule_step
from deltaflex.bench import peak_extra_gib, time_ms
from deltaflex.layers.reference import deltanet_ref
from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import make_inputs, relative_error


PARTS = ("checks", "decode", "layer_decode", "layer")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    p.add_argument("--plan", default=None, help='a plan name ("compiled", "eager") or a JSON Plan, e.g. \'{"chunk_size": 128}\'')
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--decode-batches", default="1,8,64")
    p.add_argument("--layer-shape", default="4,4096", help="B,T of the layer benchmark")
    p.add_argument("--check-length", type=int, default=256, help="T of the layer gradient check")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile of the layer (its plan still applies)")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.heads, args.decode_batches, args.layer_shape, args.check_length = 64, 2, "1,2", "1,40", 24
    args.decode_batches = [int(b) for b in args.decode_batches.split(",")]
    args.layer_shape = tuple(int(n) for n in args.layer_shape.split(","))
    args.parts = args.parts.split(",")
    if set(args.parts) - set(PARTS):
        p.error(f"--parts must be a subset of {PARTS}, got {args.parts}")
    if args.plan is not None and args.plan.startswith("{"):
        args.plan = Plan(**json.loads(args.plan))
    return args


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fla():
    """fla's ops and layer, or None: fla is a peer to measure against, never a dependency."""
    try:
        from fla.ops.delta_rule import fused_recurrent_delta_rule

        try:
            from fla.layers.delta_net import DeltaNet as FlaDeltaNet  # the flash-linear-attention wheel
        except Exception:
            FlaDeltaNet = None
        return fused_recurrent_delta_rule, FlaDeltaNet
    except Exception:
        return None


def cuda_graph(fn):
    """Captures fn() (its inputs are fixed tensors) as a CUDA graph; returns (replay, captured outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile, autotune) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def loop_us(fn, device) -> float:
    """Host-timed microseconds per call over back-to-back calls (launch overheads included)."""
    n = 300 if device.type == "cuda" else 10
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return 1e6 * (time.perf_counter() - start) / n


def kernels_per_call(fn, device) -> int | None:
    if device.type != "cuda":
        return None
    fn()
    _sync(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


# ---------------------------------------------------------------- decode step


def decode_calls(device, fla) -> dict:
    """name -> (inputs -> (o, new_state)); fla last: a failed capture of a foreign kernel cannot spoil ours."""
    calls = {"deltaflex step": lambda q, k, v, beta, h0: delta_rule_step(q, k, v, beta, h0)}  # compiled on CUDA
    if device.type == "cuda":
        calls["deltaflex step [triton]"] = lambda q, k, v, beta, h0: delta_rule_step(q, k, v, beta, h0, backend="triton")
    if fla is not None:
        calls["fla fused_recurrent"] = lambda q, k, v, beta, h0: fla[0](
            q, k, v, beta, initial_state=h0, output_final_state=True
        )
    return calls


def run_decode(args, device, fla, log):
    rows = []
    H, D = args.heads, args.hidden // args.heads
    inputs = {}
    for B in args.decode_batches:
        x = make_inputs(B, 1, H, D, dtype=torch.bfloat16, device=device, initial_state=True)
        inputs[B] = (x, *recurrent_delta_rule_ref(**x, output_final_state=True))
    for name, call in decode_calls(device, fla).items():
        for graphed in (False, True) if device.type == "cuda" else (False,):
            for B, (x, o_ref, s_ref) in inputs.items():
                row = {"part": "decode", "B": B, "H": H, "D": D, "contender": name + (" (cuda graph)" if graphed else "")}
                try:
                    args_ = tuple(x[n] for n in ("q", "k", "v", "beta", "initial_state"))
                    fn = lambda: call(*args_)  # noqa: E731
                    if graphed:
                        replay, captured = cuda_graph(fn)
                        fn = lambda: (replay(), captured)[1]  # noqa: E731
                    o, s = fn()
                    _sync(device)
                    row.update(rel_err_o=relative_error(o, o_ref), rel_err_state=relative_error(s, s_ref))
                    if device.type == "cuda":
                        row["gpu_us"] = 1e3 * time_ms(fn, device)
                    row["loop_us"] = loop_us(fn, device)
                    row["kernels"] = kernels_per_call(fn, device)
                except Exception as e:  # record and carry on: one GPU call must bring back all it can
                    row["error"] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
                rows.append(row)
                log(row)
    return rows


# ---------------------------------------------------------------- layer


def make_layers(args, device, fla):
    """Our layer (bf16, every parameter a fresh random draw) and fla's with the same weights."""
    ours = DeltaNet(args.hidden, args.heads, plan=args.plan).to(device)
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(1 + 0.2 * torch.randn_like(p))
    ours = ours.to(torch.bfloat16)
    layers = {"deltaflex layer": ours}
    if not args.no_compile:
        # dynamic=False: a graph specialised to each shape, as a training run would use
        layers["deltaflex layer (torch.compile)"] = torch.compile(ours, fullgraph=True, dynamic=False)
    if fla is not None and fla[1] is not None:
        try:
            theirs = fla[1](hidden_size=args.hidden, num_heads=args.heads, mode="chunk").to(device, torch.bfloat16)
            missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
            if missing or unexpected:  # still timed; its errors then compare other weights
                print(f"fla DeltaNet: parameters not shared: missing {missing}, unexpected {unexpected}")
            layers["fla DeltaNet"] = theirs
        except Exception as e:
            layers["fla DeltaNet"] = e
    return ours, layers


def check_layer_gradients(args, ours, layers, device, log):
    """Output and all gradients at a short length against the float64 reference layer."""
    rows = []
    x = torch.randn(1, args.check_length, args.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    o_ref = deltanet_ref(ours, x)[0]
    do = torch.randn_like(o_ref)
    leaves = [x, *ours.parameters()]
    grads_ref = torch.autograd.grad((o_ref * do).sum(), leaves)
    names = ["x", *(n for n, _ in ours.named_parameters())]
    for name, layer in layers.items():
        if "torch.compile" in name:
            continue  # checked at the timing shape, against the eager layer: one compile less
        row = {"part": "layer check", "T": args.check_length, "contender": name}
        try:
            if isinstance(layer, Exception):
                raise layer
            params = dict(layer.named_parameters())
            own = [x, *(params[n] for n in names[1:])]
            o = layer(x)[0]
            grads = torch.autograd.grad((o.double() * do).sum(), own)
            row["rel_err_o"] = relative_error(o, o_ref)
            row["rel_err_grads_max"] = max(relative_error(g, r) for g, r in zip(grads, grads_ref))
            row["rel_err_grads"] = {n: relative_error(g, r) for n, g, r in zip(names, grads, grads_ref)}
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(row)
        log(row)
    return rows


def check_decode_continuation(args, ours, device, log):
    """Prefill (chunk) then one-token steps (compiled unless --no-compile) against the whole forward."""
    prefill, steps = max(1, args.check_length - 8), 8
    # B = 1 and T = check_length: the whole forward reuses the gradient check's compiled graphs
    x = torch.randn(1, prefill + steps, args.hidden, device=device, dtype=torch.bfloat16)
    row = {"part": "decode check", "prefill": prefill, "steps": steps}
    try:
        with torch.no_grad():
            o_whole = ours(x)[0]
            _, cache = ours(x[:, :prefill], use_cache=True)
            step = lambda x_t, cache: ours(x_t, cache=cache)  # noqa: E731
            if not args.no_compile:
                step = torch.compile(step, fullgraph=True)
            pieces = []
            for t in range(prefill, prefill + steps):
                o_t, cache = step(x[:, t : t + 1], cache)
                pieces.append(o_t)
        row["rel_err_vs_whole"] = relative_error(torch.cat(pieces, dim=1), o_whole[:, prefill:])
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    log(row)
    return [row]


def random_cache(ours, B, device) -> DeltaNetCache:
    """A cache as a prefill would leave it (values do not matter to the timing)."""
    state = 0.1 * torch.randn(B, ours.num_heads, ours.head_k_dim, ours.head_v_dim, device=device)
    dims = (ours.key_dim, ours.key_dim, ours.value_dim)
    conv = tuple(torch.randn(B, ours.conv_size - 1, d, device=device, dtype=torch.bfloat16) for d in dims)
    return DeltaNetCache(state, conv)


def run_layer_decode(args, ours, device, log):
    """One token through the layer: compiled step captured as a CUDA graph, cache updated in place."""
    rows = []
    backends = [None, "triton"] if device.type == "cuda" else [None]
    for backend, B in ((backend, B) for backend in backends for B in args.decode_batches):
        row = {"part": "layer_decode", "B": B, "hidden": args.hidden, "heads": args.heads,
               "contender": f"deltaflex layer step{' [triton]' if backend else ''}"}
        try:
            x_t = torch.randn(B, 1, args.hidden, device=device, dtype=torch.bfloat16)
            cache = random_cache(ours, B, device)
            with torch.no_grad():
                ours.step_backend = None  # the reference: the default step, uncaptured
                o_eager, next_eager = ours(x_t, cache=cache)
                if B == args.decode_batches[0]:
                    torch._dynamo.reset()  # a new backend: trace the step below afresh
                ours.step_backend = backend
                step = lambda x_t, cache: ours(x_t, cache=cache)  # noqa: E731
                if not args.no_compile:
                    step = torch.compile(step, fullgraph=True, dynamic=False)
                static = DeltaNetCache(cache.recurrent_state.clone(), tuple(c.clone() for c in cache.conv_state))

                def decode_step():
                    o, new = step(x_t, static)
                    static.recurrent_state.copy_(new.recurrent_state)  # the next step reads the same buffers
                    for c, c_new in zip(static.conv_state, new.conv_state):
                        c.copy_(c_new)
                    return o

                if device.type == "cuda":
                    # cuda_graph warms up 3 times, advancing the cache: restore it before the checked replay
                    replay, o_static = cuda_graph(decode_step)
                    static.recurrent_state.copy_(cache.recurrent_state)
                    for c, c0 in zip(static.conv_state, cache.conv_state):
                        c.copy_(c0)
                    fn = replay
                    replay()
                    o = o_static
                else:
                    fn = decode_step
                    o = decode_step()
                _sync(device)
                row["rel_err_o_vs_eager"] = relative_error(o, o_eager)
                row["rel_err_state_vs_eager"] = relative_error(static.recurrent_state, next_eager.recurrent_state)
                if device.type == "cuda":
                    row["gpu_us"] = 1e3 * time_ms(fn, device)
                row["loop_us"] = loop_us(fn, device)
                row["kernels"] = kernels_per_call(fn, device)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(row)
        log(row)
    ours.step_backend = None
    return rows


def run_layer(args, ours, layers, device, log):
    # Graphs compiled for the checks' shapes would turn on dynamic shapes at this new one: start clean,
    # as a training run at one shape would.
    torch._dynamo.reset()
    B, T = args.layer_shape
    x = torch.randn(B, T, args.hidden, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        o_ref = deltanet_ref(ours, x)[0]
    do = torch.randn_like(x)
    rows, dx_eager = [], None
    for name, layer in layers.items():
        row = {"part": "layer", "B": B, "T": T, "hidden": args.hidden, "heads": args.heads, "contender": name}
        if name.startswith("deltaflex"):
            row["plan"] = str(args.plan)
        try:
            if isinstance(layer, Exception):
                raise layer
            leaf = x.detach().requires_grad_()
            grad_to_none = [leaf, *layer.parameters()]

            def fwd_bwd():
                layer(leaf)[0].backward(do)

            start = time.perf_counter()
            fwd_bwd()
            _sync(device)
            row["first_call_s"] = time.perf_counter() - start
            if name == "deltaflex layer":
                dx_eager = leaf.grad.clone()
            elif dx_eager is not None:
                row["rel_err_dx_vs_deltaflex_eager"] = relative_error(leaf.grad, dx_eager)
            # forward with grad enabled, as in training (and no second, inference-mode compile)
            row["rel_err_o"] = relative_error(layer(leaf)[0], o_ref)
            row["fwd_ms"] = time_ms(lambda: layer(leaf), device)
            row["fwd_bwd_ms"] = time_ms(fwd_bwd, device, grad_to_none=grad_to_none)
            row["tokens_per_s"] = B * T / (row["fwd_bwd_ms"] / 1e3)
            if device.type == "cuda":
                row["peak_extra_gib"] = peak_extra_gib(fwd_bwd, device, grad_to_none)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(row)
        log(row)
    fla_row = next((r for r in rows if r["contender"] == "fla DeltaNet" and "fwd_bwd_ms" in r), None)
    for r in rows:
        if fla_row and "fwd_bwd_ms" in r:
            r["speedup_vs_fla_fwd_bwd"] = fla_row["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["speedup_vs_fla_fwd"] = fla_row["fwd_ms"] / r["fwd_ms"]
    return rows


# ---------------------------------------------------------------- report


def _fmt(x, spec):
    return format("-", ">" + spec.split(".")[0].rstrip("d")) if x is None else format(x, spec)


def table(rows) -> str:
    lines = ["decode step, one token (bf16 q/k/v, fp32 state)",
             f"{'B':>3} {'contender':34} {'gpu_us':>8} {'loop_us':>8} {'kernels':>7} {'err_o':>8} {'err_S':>8}"]
    for r in sorted((r for r in rows if r["part"] == "decode"), key=lambda r: r["B"]):  # stable: by B
        if "error" in r:
            lines.append(f"{r['B']:>3} {r['contender']:34} ERROR {r['error'][:60]}")
            continue
        lines.append(
            f"{r['B']:>3} {r['contender']:34} {_fmt(r.get('gpu_us'), '8.1f')} {r['loop_us']:8.1f} "
            f"{_fmt(r.get('kernels'), '7d')} {r['rel_err_o']:8.1e} {r['rel_err_state']:8.1e}"
        )
    lines += ["", "layer decode step, one token (compiled, CUDA graph, cache updated in place)",
              f"{'B':>3} {'contender':34} {'gpu_us':>8} {'loop_us':>8} {'kernels':>7} {'err vs eager':>12}"]
    for r in rows:
        if r["part"] == "layer_decode":
            if "error" in r:
                lines.append(f"{r['B']:>3} {r['contender']:34} ERROR {r['error'][:60]}")
                continue
            lines.append(
                f"{r['B']:>3} {r['contender']:34} {_fmt(r.get('gpu_us'), '8.1f')} {r['loop_us']:8.1f} "
                f"{_fmt(r.get('kernels'), '7d')} {r['rel_err_o_vs_eager']:12.1e}"
            )
    lines += ["", "layer checks against the float64 reference layer"]
    for r in rows:
        if r["part"] in ("layer check", "decode check"):
            if "error" in r:
                lines.append(f"  {r['part']:12} {r.get('contender', ''):34} ERROR {r['error'][:60]}")
            elif r["part"] == "layer check":
                lines.append(f"  T={r['T']:<6} {r['contender']:34} err_o {r['rel_err_o']:.1e}  max err_grad {r['rel_err_grads_max']:.1e}")
            else:
                lines.append(f"  prefill {r['prefill']} + {r['steps']} decode steps vs whole forward: {r['rel_err_vs_whole']:.1e}")
    lines += ["", "layer forward+backward (bf16)",
              f"{'contender':34} {'fwd_ms':>8} {'fb_ms':>8} {'Mtok/s':>8} {'vs fla':>6} {'GiB':>6} {'err_o':>8} {'1st s':>6}"]
    for r in rows:
        if r["part"] == "layer":
            if "error" in r:
                lines.append(f"{r['contender']:34} ERROR {r['error'][:60]}")
                continue
            lines.append(
                f"{r['contender']:34} {r['fwd_ms']:8.2f} {r['fwd_bwd_ms']:8.2f} {r['tokens_per_s'] / 1e6:8.2f} "
                f"{_fmt(r.get('speedup_vs_fla_fwd_bwd'), '6.2f')} {_fmt(r.get('peak_extra_gib'), '6.2f')} "
                f"{r['rel_err_o']:8.1e} {r['first_call_s']:6.1f}"
            )
    return "\n".join(lines)


def environment(device) -> dict:
    env = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        import triton

        env["triton"] = triton.__version__
    try:
        import fla

        env["fla"] = fla.__version__
    except Exception:
        env["fla"] = None
    return env


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    fla = None if args.no_fla else _fla()
    args.out.mkdir(parents=True, exist_ok=True)
    header = {"environment": environment(device), "args": {k: str(v) for k, v in vars(args).items()}}
    rows: list[dict] = []

    def save():
        (args.out / "bench_layer.json").write_text(json.dumps({**header, "rows": rows}, indent=1))

    def log(row):
        print(json.dumps(row), flush=True)
        rows.append(row)
        save()

    ours, layers = make_layers(args, device, fla)
    if "checks" in args.parts:
        check_layer_gradients(args, ours, layers, device, log)
        check_decode_continuation(args, ours, device, log)
    if "decode" in args.parts:
        run_decode(args, device, fla, log)
    if "layer_decode" in args.parts:
        run_layer_decode(args, ours, device, log)
    if "layer" in args.parts:
        run_layer(args, ours, layers, device, log)
    save()  # run_layer adds the ratios to fla once every row is in
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
