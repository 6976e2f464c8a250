import pytest
import torch

from deltaflex.chunk.solve import (
    invert_unit_lower_blocks, kkt, kkt_backward, solve_unit_lower, solve_unit_lower_backward,
)
from deltaflex.chunk.matmul import make_dot
from deltaflex.testing import make_inputs, relative_error

DOT64, DOT32 = make_dot("fp32", torch.float64), make_dot("fp32", torch.float32)


def _chunk_keys(C, keys, dtype=torch.float64, beta_scale=1.0):
    x = make_inputs(3, C, 2, 32, dtype=dtype, keys=keys)
    return x["k"].transpose(1, 2), beta_scale * x["beta"].transpose(1, 2)  # [B, H, C, K], [B, H, C]


def _exact_inverse(a):
    eye = torch.eye(a.shape[-1], dtype=torch.float64)
    return torch.linalg.solve_triangular(eye + a.double(), eye.expand_as(a), upper=False, unitriangular=True)


@pytest.mark.parametrize("C", [16, 32, 64, 128])
@pytest.mark.parametrize("keys", ["random", "correlated"])
@pytest.mark.parametrize("beta_scale", [1.0, 2.0])  # 2.0: beta near 2, as allow_neg_eigval permits
@pytest.mark.parametrize("inverse", [solve_unit_lower, invert_unit_lower_blocks])  # the CPU's, the GPU's
def test_solve_unit_lower_is_accurate(C, keys, beta_scale, inverse):
    k, beta = _chunk_keys(C, keys, beta_scale=beta_scale)
    a64 = kkt(k, beta, DOT64)
    ref = _exact_inverse(a64)
    assert relative_error(inverse(a64), ref) < 1e-12
    # float32, where the loop-free power product is off by orders of magnitude on correlated keys
    a32 = kkt(k.float(), beta.float(), DOT32)
    t32 = inverse(a32)
    assert t32.dtype == torch.float32
    assert relative_error(t32, _exact_inverse(a32)) < 1e-5


def test_solve_unit_lower_backward_matches_autograd():
    k, beta = _chunk_keys(16, "correlated")
    a = kkt(k, beta, DOT64).requires_grad_()
    t = solve_unit_lower(a)
    dt = torch.randn_like(t)
    (t * dt).sum().backward()
    torch.testing.assert_close(solve_unit_lower_backward(t.detach(), dt), torch.tril(a.grad, -1))


def test_kkt_backward_matches_autograd():
    k, beta = _chunk_keys(32, "random")
    k.requires_grad_(), beta.requires_grad_()
    a = kkt(k, beta, DOT64)
    da = torch.tril(torch.randn_like(a), -1)
    (a * da).sum().backward()
    dk, dbeta = kkt_backward(k.detach(), beta.detach(), da, DOT64)
    torch.testing.assert_close(dk, k.grad)
    torch.testing.assert_close(dbeta, beta.grad)
