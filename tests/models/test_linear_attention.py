"""Linear attention: the chunked rule = a direct O(T^2) masked computation (outputs, final state,
gradients); the layer = DeltaNet's data flow without the delta rule; cached decoding = the full forward."""

import pytest
import torch
import torch.nn.functional as F

from deltaflex.models import LinearAttention, LinearAttentionCache, causal_linear_attention
from deltaflex.testing import relative_error

HIDDEN, HEADS = 32, 2


def linear_attention_ref(q, k, v, scale, initial_state=None):
    """o_t = scale * (q_t^T S_0 + sum_{s <= t} (q_t . k_s) v_s): the T x T causal product, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    T = q.shape[1]
    scores = torch.einsum("bthk,bshk->bhts", q, k) * torch.ones(T, T, dtype=torch.float64).tril()
    o = torch.einsum("bhts,bshv->bthv", scores, v)
    state = torch.einsum("bshk,bshv->bhkv", k, v)
    if initial_state is not None:
        o = o + torch.einsum("bthk,bhkv->bthv", q, initial_state.double())
        state = state + initial_state.double()
    return o * scale, state


@pytest.mark.parametrize("T, chunk_size", [(1, 64), (37, 16), (64, 64), (50, 64), (33, 8)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_quadratic(T, chunk_size, with_state):
    B, H, K, V = 2, 3, 8, 5
    q, k, v = (torch.randn(B, T, H, d, dtype=torch.float64, requires_grad=True) for d in (K, K, V))
    s0 = torch.randn(B, H, K, V, dtype=torch.float64, requires_grad=True) if with_state else None
    o, state = causal_linear_attention(q, k, v, scale=0.7, initial_state=s0, chunk_size=chunk_size)
    o_ref, state_ref = linear_attention_ref(q, k, v, 0.7, s0)
    assert relative_error(o, o_ref) < 1e-12 and relative_error(state, state_ref) < 1e-12
    leaves = [t for t in (q, k, v, s0) if t is not None]
    do, ds = torch.randn_like(o_ref), torch.randn_like(state_ref)
    grads = torch.autograd.grad((o * do).sum() + (state * ds).sum(), leaves)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (state_ref * ds).sum(), leaves)
    for g, r in zip(grads, grads_ref):
        assert relative_error(g, r) < 1e-12


def test_float32_inputs_compute_in_float32():
    q, k, v = (torch.randn(1, 20, 2, 4) for _ in range(3))
    o, state = causal_linear_attention(q, k, v, chunk_size=8)
    assert o.dtype == torch.float32 and state.dtype == torch.float32
    o_ref, _ = linear_attention_ref(q, k, v, 4**-0.5)
    assert relative_error(o, o_ref) < 1e-5


def test_autocast_does_not_round_the_rule():
    q, k, v = (torch.randn(1, 40, 2, 8) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, state = causal_linear_attention(q, k, v, chunk_size=16)
    o_ref, state_ref = linear_attention_ref(q, k, v, 8**-0.5)
    assert o.dtype == torch.float32 and relative_error(o, o_ref) < 1e-5 and relative_error(state, state_ref) < 1e-5


def test_layer_is_deltanets_flow_without_the_delta_rule():
    """Recomputed by hand: projections, causal depthwise conv + SiLU, L2 norm, the rule, RMSNorm, o_proj."""
    layer = LinearAttention(HIDDEN, HEADS).double()
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64)

    def conv(c, t):
        y = F.conv1d(t.transpose(1, 2), c.weight, padding=c.kernel_size - 1, groups=t.shape[-1])[..., : t.shape[1]]
        return F.silu(y.transpose(1, 2))

    heads = lambda t: t.unflatten(-1, (HEADS, HIDDEN // HEADS))  # noqa: E731
    q = F.normalize(heads(conv(layer.q_conv1d, layer.q_proj(x))), dim=-1)
    k = F.normalize(heads(conv(layer.k_conv1d, layer.k_proj(x))), dim=-1)
    v = heads(conv(layer.v_conv1d, layer.v_proj(x)))
    o, _ = linear_attention_ref(q, k, v, (HIDDEN // HEADS) ** -0.5)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps) * layer.o_norm.weight
    expected = layer.o_proj(o.flatten(2))
    assert relative_error(layer(x)[0], expected) < 1e-12


def test_without_short_convolution_the_silu_stays():
    layer = LinearAttention(HIDDEN, HEADS, use_short_conv=False).double()
    assert not hasattr(layer, "q_conv1d")
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64)
    heads = lambda t: t.unflatten(-1, (HEADS, HIDDEN // HEADS))  # noqa: E731
    q, k = (F.normalize(heads(F.silu(proj(x))), dim=-1) for proj in (layer.q_proj, layer.k_proj))
    o, _ = linear_attention_ref(q, k, heads(F.silu(layer.v_proj(x))), (HIDDEN // HEADS) ** -0.5)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps) * layer.o_norm.weight
    assert relative_error(layer(x)[0], layer.o_proj(o.flatten(2))) < 1e-12


@pytest.mark.parametrize("use_short_conv", [True, False], ids=["conv", "noconv"])
@pytest.mark.parametrize("split", [(1,), (6,), (3, 9)], ids=lambda s: "+".join(map(str, s)))
def test_cached_decoding_equals_full_forward(split, use_short_conv):
    layer = LinearAttention(HIDDEN, HEADS, use_short_conv=use_short_conv).double()
    T = 15
    x = torch.randn(2, T, HIDDEN, dtype=torch.float64)
    whole, whole_cache = layer(x, use_cache=True)
    pieces, cache, start = [], None, 0
    for n in [*split, *[1] * (T - sum(split))]:
        o, cache = layer(x[:, start : start + n], cache=cache, use_cache=True)
        pieces.append(o)
        start += n
    assert isinstance(cache, LinearAttentionCache)
    assert relative_error(torch.cat(pieces, dim=1), whole) < 1e-12
    assert relative_error(cache.state, whole_cache.state) < 1e-12
    if not use_short_conv:
        assert cache.conv_state is None
        return
    for c, w in zip(cache.conv_state, whole_cache.conv_state):
        assert relative_error(c, w) < 1e-12


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_heads = 3 must divide"):
        LinearAttention(HIDDEN, 3)
    layer = LinearAttention(HIDDEN, HEADS)
    x = torch.randn(2, 4, HIDDEN)
    _, cache = layer(x, use_cache=True)
    with pytest.raises(ValueError, match=r"hidden_states must be \[B, T, hidden_size=32\]"):
        layer(x[..., :8])
    with pytest.raises(TypeError, match="cache must be a LinearAttentionCache"):
        layer(x, cache=cache.state)
    with pytest.raises(ValueError, match=r"cache.state must be \[B, H, K, V\] = \(1, 2, 16, 16\)"):
        layer(x[:1], cache=cache)
    with pytest.raises(ValueError, match="cache.conv_state must .* be None without"):
        LinearAttention(HIDDEN, HEADS, use_short_conv=False)(x, cache=cache)
    with pytest.raises(TypeError, match="use_short_conv must be a bool"):
        LinearAttention(HIDDEN, HEADS, use_short_conv=0)
