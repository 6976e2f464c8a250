"""RMSNorm and the SiLU-gated RMSNorm against their formulas in float64."""

import torch

from deltaflex.layers.norm import GatedRMSNorm, RMSNorm, rms_norm
from deltaflex.testing import relative_error


def _rms_ref(x, w, eps):
    x = x.double()
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w.double()


def test_rms_norm():
    norm = RMSNorm(16, eps=1e-5)
    norm.weight.data = torch.randn(16)
    x = 3 * torch.randn(2, 5, 4, 16)
    assert relative_error(norm(x), _rms_ref(x, norm.weight, 1e-5)) < 1e-6


def test_gated_rms_norm_in_bfloat16():
    norm = GatedRMSNorm(16, eps=1e-6)
    norm.weight.data = torch.randn(16)
    x, g = torch.randn(2, 5, 4, 16).bfloat16(), torch.randn(2, 5, 4, 16).bfloat16()
    y = norm(x, g)
    g64 = g.double()
    assert y.dtype == torch.bfloat16
    assert relative_error(y, _rms_ref(x, norm.weight, 1e-6) * g64 * torch.sigmoid(g64)) < 1e-2


def test_gradients():
    norm = GatedRMSNorm(8).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x, g = (torch.randn(3, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(norm, (x, g))
    w = norm.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w: rms_norm(x, w, norm.eps), (w,))
