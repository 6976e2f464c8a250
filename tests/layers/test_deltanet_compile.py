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


def _copy(cache):
    return cache._replace(recurrent_state=cache.recurrent_state.clone(), conv_state=tuple(c.clone() for c in cache.conv_state))


def _load(dst, src):
    dst.recurrent_state.copy_(src.recurrent_state)
    for d, s in zip(dst.conv_state, src.conv_state):
        d.copy_(s)


@pytest.mark.gpu
@pytest.mark.parametrize("step_backend", [None, "triton"])
def test_decode_step_replays_as_cuda_graph_without_host_syncs(step_backend):
    layer = _layer("cuda").bfloat16()
    layer.step_backend = step_backend
    x = torch.randn(2, 12, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        _, prefilled = layer(x[:, :9], use_cache=True)
        expected, cache = [], prefilled
        for t in (9, 10, 11):
            o, cache = layer(x[:, t : t + 1], cache=cache)
            expected.append(o)

        x_t, static = x[:, 9:10].clone(), _copy(prefilled)

        def step():  # one token; the cache is updated in place, so every replay reads the same buffers
            o, new = layer(x_t, cache=static)
            _load(static, new)
            return o

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up outside the capture (compiles the step)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # a host sync inside the step would fail the capture
            o_static = step()
        _load(static, prefilled)  # the warm-up advanced it
        for t, o_expected in zip((9, 10, 11), expected):
            x_t.copy_(x[:, t : t + 1])
            graph.replay()
            assert relative_error(o_static, o_expected) < 1e-2, t
