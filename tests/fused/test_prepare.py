"""The fused path's chunk inverse (deltaflex/fused/prepare.py: `invert_unit_lower`, doubling on the
16 x 16 diagonal blocks, then products of the off-diagonal part) against float64's, on random and
correlated keys (beta near 1, where the entries of T telescope), at every chunk size the path takes."""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from deltaflex.fused.prepare import invert_unit_lower  # noqa: E402
from deltaflex.testing import make_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _invert(a_ptr, t_ptr, C: tl.constexpr, LOW: tl.constexpr):
    rc = tl.arange(0, C)
    a = tl.load(a_ptr + rc[:, None] * C + rc[None, :])
    tl.store(t_ptr + rc[:, None] * C + rc[None, :], invert_unit_lower(a, C, LOW))


def _strictly_lower(C: int, keys: str) -> torch.Tensor:
    """A = tril(diag(beta) K K^T, -1) of one chunk of fresh keys (deltaflex.testing's random or
    correlated ones), in float64."""
    x = make_inputs(1, C, 1, 32, dtype=torch.float64, keys=keys)
    k, beta = x["k"][0, :, 0], x["beta"][0, :, 0]
    return torch.tril(beta[:, None] * (k @ k.T), -1)


@pytest.mark.parametrize("C", [16, 32, 64])
@pytest.mark.parametrize("keys", ["random", "correlated"])
@pytest.mark.parametrize("low", [1, 0], ids=["bf16-split", "fp32"])
def test_inverse_matches_float64(C, keys, low):
    a = _strictly_lower(C, keys)
    t = torch.empty(C, C, device=DEVICE)
    _invert[(1,)](a.float().to(DEVICE), t, C=C, LOW=low)
    ref = torch.linalg.inv(torch.eye(C, dtype=torch.float64) + a)
    error = ((t.cpu().double() - ref).norm() / ref.norm()).item()
    # bf16 hi + lo products: about 2^-16 of each product (1e-5 on correlated keys); 3xTF32 near float32
    assert error < (6e-5 if low else 2e-6), error
