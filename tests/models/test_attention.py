"""Attention: against a direct softmax over explicit masks (rotary by complex numbers), the sliding
window's reach, SDPA = flex_attention, and cached decoding (ring buffer included) = the full forward."""

import math

import pytest
import torch

from deltaflex.models import Attention, KVCache
from deltaflex.models.attention import Rotary
from deltaflex.testing import relative_error

HIDDEN, HEADS = 32, 2


def make_attention(window=None, backend="sdpa", dtype=torch.float64):
    return Attention(HIDDEN, HEADS, window, rope_theta=100.0, backend=backend).to(dtype)


def rotary_ref(x, positions, theta):
    """Rotation of each pair (x_i, x_{i + D/2}) by positions * theta^(-2i/D), as complex numbers."""
    D = x.shape[-1]
    freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    turn = torch.polar(torch.ones(len(positions), D // 2, dtype=torch.float64), positions[:, None].double() * freq)
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2 :].double()) * turn
    return torch.cat([z.real, z.imag], dim=-1)


def attention_ref(layer, x, window=None):
    """softmax(q k^T / sqrt(D) + mask) v per head, with every query's visible keys spelled out."""
    B, T, _ = x.shape
    heads = lambda t: t.view(B, T, HEADS, -1).transpose(1, 2).double()  # noqa: E731
    q, k, v = heads(layer.q_proj(x)), heads(layer.k_proj(x)), heads(layer.v_proj(x))
    pos = torch.arange(T)
    q, k = rotary_ref(q, pos, 100.0), rotary_ref(k, pos, 100.0)
    visible = torch.tensor([[s <= t and (window is None or t - s < window) for s in range(T)] for t in range(T)])
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~visible, float("-inf"))
    o = scores.softmax(-1) @ v
    return layer.o_proj(o.transpose(1, 2).reshape(B, T, HIDDEN).to(x.dtype))


@pytest.mark.parametrize("window", [None, 1, 4, 50])
def test_forward_matches_explicit_softmax(window):
    layer = make_attention(window)
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64)
    o, cache = layer(x)
    assert cache is None
    assert relative_error(o, attention_ref(layer, x, window)) < 1e-12


def test_rotary_scores_depend_only_on_the_offset():
    rotary = Rotary(8, theta=10.0).double()
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(m, n):
        return (rotary(q, torch.tensor([m])) * rotary(k, torch.tensor([n]))).sum()

    assert torch.allclose(score(3, 1), score(12, 10)) and torch.allclose(score(0, 0), (q * k).sum())
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_sliding_window_reach():
    """The output at t moves with the tokens at t - W + 1 .. t and with none before them."""
    W, T, t = 4, 12, 9
    layer = make_attention(W)
    x = torch.randn(1, T, HIDDEN, dtype=torch.float64)
    o = layer(x)[0]
    for s in range(T):
        y = x.clone()
        y[0, s] += 1.0
        moved = not torch.allclose(layer(y)[0][0, t], o[0, t], atol=1e-12, rtol=0)
        assert moved == (t - W < s <= t), s


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [None, 5])
def test_flex_attention_equals_sdpa(window):
    sdpa, flex = make_attention(window, dtype=torch.float32), make_attention(window, "flex", torch.float32)
    flex.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 21, HIDDEN)
    with torch.no_grad():  # flex_attention has no CPU backward
        assert relative_error(flex(x)[0], sdpa(x)[0]) < 1e-5


# prefill pieces before token-by-token decoding: shorter and longer than the window, several pieces
SPLITS = [(1,), (3,), (9,), (4, 7), (2, 1, 6)]


@pytest.mark.parametrize("window", [None, 1, 5])
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "+".join(map(str, s)))
def test_cached_decoding_equals_full_forward(window, split):
    layer = make_attention(window)
    T = 16
    x = torch.randn(2, T, HIDDEN, dtype=torch.float64)
    whole = layer(x)[0]
    pieces, cache, start = [], None, 0
    for n in [*split, *[1] * (T - sum(split))]:
        o, cache = layer(x[:, start : start + n], cache=cache, use_cache=True)
        pieces.append(o)
        start += n
        slots = cache.key.shape[2]
        assert slots == (start if window is None else window)  # a ring holds exactly the window
    assert relative_error(torch.cat(pieces, dim=1), whole) < 1e-12
    expected = torch.arange(T) if window is None else torch.arange(T - window, T)
    assert sorted(cache.positions.tolist()) == expected.tolist()


def test_ring_buffer_slots_hold_position_mod_window():
    layer = make_attention(3)
    _, cache = layer(torch.randn(1, 7, HIDDEN, dtype=torch.float64), use_cache=True)
    assert cache.positions.tolist() == [6, 4, 5]  # slot = position mod 3
    _, cache = layer(torch.randn(1, 1, HIDDEN, dtype=torch.float64), cache=cache)
    assert cache.positions.tolist() == [6, 7, 5]


def test_bad_arguments():
    with pytest.raises(ValueError, match="window_size must be None"):
        Attention(HIDDEN, HEADS, window_size=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        Attention(HIDDEN, HEADS, backend="xformers")
    with pytest.raises(ValueError, match="num_heads = 3 must divide"):
        Attention(HIDDEN, 3)
    with pytest.raises(ValueError, match="even head dim"):
        Attention(HIDDEN, 32)
    layer = make_attention(4)
    x = torch.randn(2, 5, HIDDEN, dtype=torch.float64)
    _, cache = layer(x, use_cache=True)
    with pytest.raises(ValueError, match=r"hidden_states must be \[B, T, hidden_size=32\]"):
        layer(x[0])
    with pytest.raises(ValueError, match="at least one token"):
        layer(x[:, :0])
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        layer(x, cache=(cache.key, cache.value))
    with pytest.raises(ValueError, match=r"cache.key must be \[B, H, S, D\] with B, H, D = \(1, 2, 16\)"):
        layer(x[:1], cache=cache)
    with pytest.raises(ValueError, match="window_size = 4 slots"):
        layer(x, cache=KVCache(cache.key[:, :, :2], cache.value[:, :, :2], cache.positions[:2]))
