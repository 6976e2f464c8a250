"""The layer under torch.compile(fullgraph=True) at a tiny size: training (forward + backward) and
the decode step with a cache. Each graph costs tens of seconds to compile on CPU, so there are few."""

import pytest
import torch

from deltaflex import DeltaNet, Plan
from deltaflex.layers.reference import deltanet_ref
from deltaflex.testing import relative_error

pytestmark = pytest.mark.compile


def _layer(device):
    # compile=False: the eager calls stay eager; inside torch.compile the plan is traced either way
    layer = DeltaNet(32, 2, use_gate=True, allow_neg_eigval=True, plan=Plan(chunk_size=16, compile=False)).to(device)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return layer


def test_training_step_compiles_fullgraph(device):
    torch._dynamo.reset()
    layer = _layer(device)
    x = torch.randn(2, 20, 32, device=device, requires_grad=True)
    do = torch.randn(2, 20, 32, device=device, dtype=torch.float64)
    leaves = [x, *layer.parameters()]

    def grads(fn):
        return torch.autograd.grad((fn(x)[0].double() * do).sum(), leaves)

    compiled = torch.compile(layer, fullgraph=True)
    o = compiled(x)[0]
    o_ref = deltanet_ref(layer, x)[0]
    assert relative_error(o, o_ref) < 1e-4
    for g, g_ref in zip(grads(compiled), grads(lambda t: deltanet_ref(layer, t))):
        assert relative_error(g, g_ref) < 1e-4


def test_decode_step_compiles_fullgraph(device):
    torch._dynamo.reset()
    layer = _layer(device)
    x = torch.randn(3, 12, 32, device=device)
    prefill = 9
    step = torch.compile(lambda x_t, cache: layer(x_t, cache=cache), fullgraph=True)
    outputs = []
    with torch.no_grad():
        o_whole = layer(x)[0]
        _, cache = layer(x[:, :prefill], use_cache=True)
        for t in range(prefill, 12):
            o_t, cache = step(x[:, t : t + 1], cache)
            outputs.append(o_t)
    assert relative_error(torch.cat(outputs, dim=1), o_whole[:, prefill:]) < 1e-5
