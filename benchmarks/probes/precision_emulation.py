"""Which float32 operands of the chunkwise delta rule must stay float32 in bf16 training: the fused
path's scheme (docs/design-fused.md) against fla's and against float32 throughout, by emulation on
the CPU against the float64 oracle (no GPU, no Triton).

    python benchmarks/probes/precision_emulation.py

Every product is exact (float64) on operands rounded as the scheme says: "bf16" rounds a float32
operand once, "split" keeps it (hi + lo bf16 products carry it to ~float32 accuracy), as the
tensor cores compute with float32 accumulation. Prints o's and every gradient's relative error at
(2, 300, 4, 64) on random keys and on correlated keys (beta near 1), the worst of two seeds.
"""

import torch

from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import make_inputs, relative_error

C = 64


def rnd(x):
    return x.to(torch.bfloat16).float()


def op(x, how):
    return x if how == "split" else rnd(x)


def mm(a, b):
    return (a.double() @ b.double()).float()


def chunks(x):
    B, T, H = x.shape[:3]
    N = -(-T // C)
    x = torch.nn.functional.pad(x.float(), (0, 0) * (x.dim() - 3) + (0, 0, 0, N * C - T))
    return x.reshape(B, N, C, H, *x.shape[3:]).transpose(2, 3).transpose(1, 2)  # B H N C ...


def unchunk(x, T):
    B, H, N = x.shape[:3]
    return x.transpose(1, 2).transpose(2, 3).reshape(B, N * C, H, *x.shape[4:])[:, :T]


# where each float32 operand is rounded ("bf16") or kept ("split"); "store" entries round a stored tensor
FLA = dict(T="bf16", Tb_wu="bf16", W="bf16", U="bf16", S="bf16", Vn="bf16", P="bf16", dS="bf16", dVn="bf16",
           dP="bf16", dW="bf16", Tb_bwd="bf16", dA="bf16")
FLOAT32 = {name: "split" for name in FLA}  # every switchable operand split (a few stay rounded)
FUSED = dict(FLA, T="split", Tb_wu="split", U="split", Vn="split", P="split", dVn="split", dP="split", dA="split")


def forward(q, k, v, beta, scale, s):
    qc, kc, vc, bc = (chunks(x) for x in (q, k, v, beta))
    B, H, N = qc.shape[:3]
    mask = torch.tril(torch.ones(C, C))
    a = torch.tril(bc[..., None] * mm(kc, kc.transpose(-1, -2)), -1)
    eye = torch.eye(C)
    t = op(torch.linalg.solve_triangular(eye + a, eye.expand_as(a), upper=False, unitriangular=True), s["T"])
    tb = op(t * bc[..., None, :], s["Tb_wu"])
    w, u = op(mm(tb, kc), s["W"]), op(mm(tb, vc), s["U"])
    S, outs, vns, states = torch.zeros(B, H, kc.shape[-1], vc.shape[-1]), [], [], []
    for n in range(N):
        states.append(S)
        vn = u[:, :, n] - mm(w[:, :, n], op(S, s["S"]))
        p = mm(qc[:, :, n], kc[:, :, n].transpose(-1, -2)) * mask
        outs.append(scale * (mm(qc[:, :, n], op(S, s["S"])) + mm(op(p, s["P"]), op(vn, s["Vn"]))))
        S = S + mm(kc[:, :, n].transpose(-1, -2), op(vn, s["Vn"]))
        vns.append(vn)
    saved = dict(qc=qc, kc=kc, vc=vc, bc=bc, t=t, w=w, vn=torch.stack(vns, 2), states=torch.stack(states, 2))
    return torch.stack(outs, 2), saved


def backward(do, scale, x, s):
    qc, kc, vc, bc, t, w, vns, states = (x[n] for n in ("qc", "kc", "vc", "bc", "t", "w", "vn", "states"))
    doc = chunks(do)
    mask = torch.tril(torch.ones(C, C))
    dS = torch.zeros(states.shape[:2] + states.shape[3:])
    dq, dk, dw, du = (torch.zeros_like(y) for y in (qc, kc, w, vns))
    for n in reversed(range(qc.shape[2])):
        q_, k_, do_, vn, S = qc[:, :, n], kc[:, :, n], doc[:, :, n], vns[:, :, n], states[:, :, n]
        p = mm(q_, k_.transpose(-1, -2)) * mask
        dvn = scale * mm(op(p, s["P"]).transpose(-1, -2), do_) + mm(k_, op(dS, s["dS"]))
        dp = scale * mm(do_, op(vn, s["Vn"]).transpose(-1, -2)) * mask
        dq[:, :, n] = scale * mm(do_, rnd(S).transpose(-1, -2)) + mm(op(dp, s["dP"]), k_)
        dk[:, :, n] = mm(rnd(dp).transpose(-1, -2), q_) + mm(rnd(vn), op(dS, s["dS"]).transpose(-1, -2))
        dw[:, :, n] = -mm(rnd(dvn), rnd(S).transpose(-1, -2))
        du[:, :, n] = dvn if s["dVn"] == "split" else rnd(dvn)
        dS = dS + scale * mm(q_.transpose(-1, -2), do_) - mm(w[:, :, n].transpose(-1, -2), rnd(dvn))
    dw = op(dw, s["dW"])
    tb = t * bc[..., None, :]
    dtb = mm(dw, kc.transpose(-1, -2)) + mm(op(du, s["dVn"]), vc.transpose(-1, -2))
    dk = dk + mm(op(tb, s["Tb_bwd"]).transpose(-1, -2), dw)
    dv = mm(op(tb, s["Tb_bwd"]).transpose(-1, -2), op(du, s["dVn"]))
    dbeta = (dtb * t).sum(-2)
    da = torch.tril(-mm(mm(op(t, s["dA"]).transpose(-1, -2), dtb * bc[..., None, :]), op(t, s["dA"]).transpose(-1, -2)),
                    -1)
    dbeta = dbeta + (da * mm(kc, kc.transpose(-1, -2))).sum(-1)
    dab = rnd(bc[..., None] * da)
    dk = dk + mm(dab, kc) + mm(dab.transpose(-1, -2), kc)
    return dq, dk, dv, dbeta


def errors(scheme, keys, seed, shape=(2, 300, 4, 64)):
    g = torch.Generator().manual_seed(seed)
    B, T, H, D = shape
    x = make_inputs(B, T, H, D, dtype=torch.bfloat16, keys=keys, generator=g)
    q, k, v, beta = x["q"], x["k"], x["v"], x["beta"]
    do = torch.randn(B, T, H, D, generator=g).bfloat16()
    leaves = [t.double().requires_grad_() for t in (q, k, v, beta)]
    o_ref, _ = recurrent_delta_rule_ref(*leaves)
    refs = torch.autograd.grad(o_ref, leaves, do.double())
    o, saved = forward(q, k, v, beta, D ** -0.5, scheme)
    grads = backward(do, D ** -0.5, saved, scheme)
    grads = [unchunk(g_, T) if g_.dim() == 5 else unchunk(g_[..., None], T)[..., 0] for g_ in grads]
    return [relative_error(unchunk(o, T).bfloat16(), o_ref)] + [relative_error(a.bfloat16(), r)
                                                                 for a, r in zip(grads, refs)]


if __name__ == "__main__":
    for keys in ("random", "correlated"):
        print(keys)
        for name, scheme in (("fla's", FLA), ("fused path's", FUSED), ("every switch split", FLOAT32)):
            worst = [max(e) for e in zip(*(errors(scheme, keys, seed) for seed in range(2)))]
            print(f"  {name:20s} " + " ".join(f"{n} {e:.2e}" for n, e in zip(("o", "dq", "dk", "dv", "dbeta"), worst)))
