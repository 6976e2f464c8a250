"""Every bad input raises the named error before any compute."""

import pytest
import torch

from deltaflex import delta_rule
from deltaflex.testing import make_inputs


def good(**overrides):
    x = make_inputs(2, 10, 3, 8, 6, dtype=torch.float32, initial_state=True)
    x.update(overrides)
    return x


def q_like(shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


CASES = [
    ("q is not a tensor", dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ("q wrong rank", dict(q=q_like((2, 10, 24))), ValueError, r"q must be 4-D \[B, T, H, K\]"),
    ("k mismatched", dict(k=q_like((2, 10, 3, 9))), ValueError, "k must have q's shape"),
    ("v mismatched T", dict(v=q_like((2, 11, 3, 6))), ValueError, r"v must be \[B, T, H, V\]"),
    ("v wrong rank", dict(v=q_like((2, 10, 3))), ValueError, r"v must be \[B, T, H, V\]"),
    ("beta wrong shape", dict(beta=q_like((2, 10, 3, 1))), ValueError, r"beta must be \[B, T, H\]"),
    ("beta per value", dict(beta=q_like((2, 10, 3, 6))), ValueError, r"beta must be \[B, T, H\]"),
    ("initial_state count", dict(initial_state=q_like((3, 3, 8, 6))), ValueError, r"initial_state must be \[N, H, K, V\]"),
    ("initial_state dims", dict(initial_state=q_like((2, 3, 6, 8))), ValueError, r"initial_state must be \[N, H, K, V\]"),
    ("initial_state float64", dict(initial_state=q_like((2, 3, 8, 6), torch.float64)), TypeError, "initial_state must have"),
    ("initial_state not tensor", dict(initial_state=0.0), TypeError, "initial_state must be a torch.Tensor"),
    ("integer q", dict(q=torch.ones(2, 10, 3, 8, dtype=torch.int64)), TypeError, "q must have a floating dtype"),
    ("k dtype", dict(k=q_like((2, 10, 3, 8), torch.float64)), TypeError, "k must have q's dtype"),
    ("v dtype", dict(v=q_like((2, 10, 3, 6), torch.bfloat16)), TypeError, "v must have q's dtype"),
    ("beta dtype", dict(beta=q_like((2, 10, 3), torch.float64)), TypeError, "beta must have q's dtype"),
    ("empty T", dict(q=q_like((2, 0, 3, 8)), k=q_like((2, 0, 3, 8)), v=q_like((2, 0, 3, 6)), beta=q_like((2, 0, 3))),
     ValueError, "non-empty"),
    ("K over 256", dict(q=q_like((2, 10, 3, 257)), k=q_like((2, 10, 3, 257)), initial_state=None), ValueError, "at most 256"),
    ("V over 256", dict(v=q_like((2, 10, 3, 300)), initial_state=None), ValueError, "at most 256"),
]


@pytest.mark.parametrize("name,overrides,error,match", CASES, ids=[c[0] for c in CASES])
def test_bad_tensors(name, overrides, error, match):
    with pytest.raises(error, match=match):
        delta_rule(**good(**overrides), plan="eager")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(scale=0.0), ValueError, "scale must be a finite positive"),
        (dict(scale=-1.0), ValueError, "scale must be a finite positive"),
        (dict(scale=float("nan")), ValueError, "scale must be a finite positive"),
        (dict(scale="0.1"), TypeError, "scale must be a positive real"),
        (dict(chunk_size=48), ValueError, "chunk_size must be one of"),
        (dict(chunk_size=256), ValueError, "chunk_size must be one of"),
        (dict(chunk_size=64.0), ValueError, "chunk_size must be one of"),
        (dict(plan="fastest"), ValueError, "plan must be"),
        (dict(plan=3), TypeError, "plan must be"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        delta_rule(**good(), **kwargs)


@pytest.mark.gpu
def test_inputs_on_different_devices():
    with pytest.raises(ValueError, match="all inputs must share a device"):
        delta_rule(**good(v=q_like((2, 10, 3, 6)).cuda()))
    x = {n: t.cuda() for n, t in good().items()}
    with pytest.raises(ValueError, match="initial_state is on"):
        delta_rule(**{**x, "initial_state": x["initial_state"].cpu()})


def test_inputs_on_different_devices_meta():
    # Runs without a GPU: the meta device stands in for "another device".
    with pytest.raises(ValueError, match="all inputs must share a device"):
        delta_rule(**good(beta=torch.empty(2, 10, 3, device="meta")))
