import pytest
import torch

from deltaflex.chunk.matmul import make_dot
from deltaflex.chunk.state import Stepping, state_pass, state_pass_backward

DOT = make_dot("fp32", torch.float64)
STEPPINGS = [Stepping(kind, group) for kind in ("loop", "scan") for group in (1, 2, 4)]


def _inputs(B=2, H=3, N=8, C=4, K=6, V=3):
    def r(*shape):
        return torch.randn(*shape, dtype=torch.float64)

    return {"q": r(B, H, N, C, K), "k": 0.3 * r(B, H, N, C, K), "w": 0.3 * r(B, H, N, C, K), "u": r(B, H, N, C, V),
            "do": r(B, H, N, C, V), "dv_local": r(B, H, N, C, V), "s0": r(B, H, K, V), "ds": r(B, H, K, V)}


@pytest.mark.parametrize("impl", STEPPINGS, ids=str)
def test_state_pass(impl):
    x = _inputs()
    v_new, states, final = state_pass(x["k"], x["w"], x["u"], x["s0"], dot=DOT, impl=impl)
    s = x["s0"]
    for n in range(x["k"].shape[2]):
        torch.testing.assert_close(states[:, :, n], s)
        vn = x["u"][:, :, n] - x["w"][:, :, n] @ s
        torch.testing.assert_close(v_new[:, :, n], vn)
        s = s + x["k"][:, :, n].transpose(-1, -2) @ vn
    torch.testing.assert_close(final, s)


@pytest.mark.parametrize("impl", STEPPINGS, ids=str)
def test_state_pass_backward(impl):
    x = _inputs()
    dv_new, ds_next, ds0 = state_pass_backward(
        x["q"], x["k"], x["w"], x["do"], x["dv_local"], x["ds"], 0.5, dot=DOT, impl=impl
    )
    ds = x["ds"]
    for n in reversed(range(x["k"].shape[2])):
        torch.testing.assert_close(ds_next[:, :, n], ds)
        dvn = x["dv_local"][:, :, n] + x["k"][:, :, n] @ ds
        torch.testing.assert_close(dv_new[:, :, n], dvn)
        ds = ds + 0.5 * x["q"][:, :, n].transpose(-1, -2) @ x["do"][:, :, n] - x["w"][:, :, n].transpose(-1, -2) @ dvn
    torch.testing.assert_close(ds0, ds)


def test_scan_accepts_an_expanded_carry():
    # The gradient of `final_state.sum()` arrives expanded (stride 0); the scan must not misread it.
    x = _inputs()
    ds = torch.ones((), dtype=torch.float64).expand_as(x["ds"])
    args = (x["q"], x["k"], x["w"], x["do"], x["dv_local"])
    scanned = state_pass_backward(*args, ds, 1.0, dot=DOT, impl=Stepping("scan"))
    looped = state_pass_backward(*args, ds.contiguous(), 1.0, dot=DOT, impl=Stepping("loop"))
    for a, b in zip(scanned, looped):
        torch.testing.assert_close(a, b)


def test_bad_stepping():
    x = _inputs(N=6)
    with pytest.raises(ValueError, match="kind"):
        state_pass(x["k"], x["w"], x["u"], x["s0"], dot=DOT, impl=Stepping("nope"))
    with pytest.raises(ValueError, match="multiple of group=4"):
        state_pass(x["k"], x["w"], x["u"], x["s0"], dot=DOT, impl=Stepping("loop", 4))
