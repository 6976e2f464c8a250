"""The DeltaNet layer: chunk mode = recurrent mode = the float64 reference layer (outputs, caches,
gradients of the input and of every parameter); prefill + decode = the whole sequence; left padding."""

import pytest
import torch

from deltaflex import DeltaNet, DeltaNetCache, Plan
from deltaflex.layers.reference import deltanet_ref
from deltaflex.testing import TOLERANCES, relative_error

HIDDEN, HEADS = 32, 2
EAGER_16 = Plan(chunk_size=16, compile=False)  # several chunks at the tiny test lengths

CONFIGS = {
    "default": {},
    "gate": {"use_gate": True},
    "elu_sum": {"qk_activation": "elu", "qk_norm": "sum", "conv_bias": True},
    "relu_wide_v": {"qk_activation": "relu", "expand_v": 2.0},
    "identity_no_beta": {"qk_activation": "identity", "use_beta": False, "conv_size": 2},
    "no_conv_neg_eigval": {"use_short_conv": False, "allow_neg_eigval": True, "use_gate": True},
    "neg_eigval": {"allow_neg_eigval": True},
}


def make_layer(dtype=torch.float32, **kwargs):
    """A layer whose every parameter is a fresh random draw (norm weights and biases too)."""
    layer = DeltaNet(HIDDEN, HEADS, plan=EAGER_16, **kwargs).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return layer


def _grads(out, inputs, cotangent):
    return torch.autograd.grad((out.double() * cotangent).sum(), inputs)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunk_equals_recurrent_equals_reference(config, dtype):
    layer = make_layer(dtype, **CONFIGS[config])
    x = torch.randn(2, 37, HIDDEN, dtype=dtype, requires_grad=True)
    leaves = [x, *layer.parameters()]
    o_ref, state_ref, conv_ref = deltanet_ref(layer, x)
    do = torch.randn_like(o_ref)
    grads_ref = _grads(o_ref, leaves, do)
    tol = TOLERANCES[dtype]
    for mode in ("chunk", "recurrent"):
        layer.mode = mode
        o, cache = layer(x, use_cache=True)
        assert o.dtype == dtype and o.shape == x.shape
        errors = {"o": relative_error(o, o_ref), "state": relative_error(cache.recurrent_state, state_ref)}
        if conv_ref is not None:
            errors.update({f"conv_{n}": relative_error(c, r) for n, c, r in zip("qkv", cache.conv_state, conv_ref)})
        names = ["x", *(n for n, _ in layer.named_parameters())]
        errors.update({f"d{n}": relative_error(g, r) for n, g, r in zip(names, _grads(o, leaves, do), grads_ref)})
        bad = {n: e for n, e in errors.items() if not e < tol}
        assert not bad, f"mode {mode}: relative errors over {tol:g}: {bad}"


def test_bfloat16_layer_near_reference():
    layer = make_layer(torch.bfloat16, use_gate=True)
    x = torch.randn(2, 40, HIDDEN, dtype=torch.bfloat16)
    o, cache = layer(x, use_cache=True)
    o_ref, state_ref, _ = deltanet_ref(layer, x)
    assert o.dtype == torch.bfloat16 and cache.recurrent_state.dtype == torch.float32
    assert relative_error(o, o_ref) < 2e-2  # bfloat16 activations between every op, as in fla
    assert relative_error(cache.recurrent_state, state_ref) < 2e-2


SPLITS = [(1,), (5,), (16,), (23, 4), (31,)]  # prefill length, then optional multi-token pieces


@pytest.mark.parametrize("config", ["default", "no_conv_neg_eigval", "neg_eigval"])
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "+".join(map(str, s)))
def test_prefill_then_decode_equals_whole(config, mode, split):
    layer = make_layer(**CONFIGS[config])
    T = 36
    x = torch.randn(2, T, HIDDEN)
    layer.mode = "chunk"
    o_whole, cache_whole = layer(x, use_cache=True)
    layer.mode = mode
    pieces, cache, start = [], None, 0
    for n in split:  # prefill, possibly in several pieces
        o, cache = layer(x[:, start : start + n], cache=cache, use_cache=True)
        pieces.append(o)
        start += n
    while start < T:  # then token by token
        o, cache = layer(x[:, start : start + 1], cache=cache)
        pieces.append(o)
        start += 1
    assert relative_error(torch.cat(pieces, dim=1), o_whole) < 1e-5
    assert relative_error(cache.recurrent_state, cache_whole.recurrent_state) < 1e-5
    if layer.use_short_conv:
        for c, c_whole in zip(cache.conv_state, cache_whole.conv_state):
            assert relative_error(c, c_whole) < 1e-6
    else:
        assert cache.conv_state is None


@pytest.mark.parametrize("config", ["default", "no_conv_neg_eigval", "elu_sum"])
def test_left_padded_prefill_then_decode(config):
    layer = make_layer(torch.float64, **CONFIGS[config])
    T, new = 20, 3
    pads = [0, 5, 18]  # the last row keeps 2 real tokens: fewer than conv_size - 1
    mask = torch.ones(3, T, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    x = torch.randn(3, T + new, HIDDEN, dtype=torch.float64)
    x[:, :T][mask == 0] = 1e3 * torch.randn_like(x[:, :T][mask == 0])  # padding must not leak in
    o, cache = layer(x[:, :T], attention_mask=mask, use_cache=True)
    o_ref, state_ref, conv_ref = deltanet_ref(layer, x[:, :T], mask)
    assert relative_error(o, o_ref) < 1e-10
    assert torch.all(o[mask == 0] == 0)
    assert relative_error(cache.recurrent_state, state_ref) < 1e-10
    if conv_ref is not None:
        for c, r in zip(cache.conv_state, conv_ref):
            assert relative_error(c, r) < 1e-12
    # decoding after a padded prefill continues each row's unpadded sequence
    decoded = []
    for t in range(T, T + new):
        wide_mask = torch.ones(3, t + 1, dtype=torch.bool)  # HF-style masks cover past tokens too
        o_t, cache = layer(x[:, t : t + 1], attention_mask=wide_mask, cache=cache)
        decoded.append(o_t)
    full_mask = torch.cat([mask, torch.ones(3, new, dtype=torch.long)], dim=1)
    o_full_ref, _, _ = deltanet_ref(layer, x, full_mask)
    assert relative_error(torch.cat(decoded, dim=1), o_full_ref[:, T:]) < 1e-10


def test_parameter_names_and_shapes_follow_fla():
    layer = DeltaNet(64, 4, expand_v=2.0, use_gate=True, conv_bias=True)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {
        "q_proj.weight": (64, 64),
        "k_proj.weight": (64, 64),
        "v_proj.weight": (128, 64),
        "b_proj.weight": (4, 64),
        "q_conv1d.weight": (64, 1, 4),
        "q_conv1d.bias": (64,),
        "k_conv1d.weight": (64, 1, 4),
        "k_conv1d.bias": (64,),
        "v_conv1d.weight": (128, 1, 4),
        "v_conv1d.bias": (128,),
        "g_proj.weight": (128, 64),
        "o_norm.weight": (32,),
        "o_proj.weight": (64, 128),
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "fused_chunk"}, "mode must be one of"),
        ({"qk_activation": "gelu"}, "qk_activation must be one of"),
        ({"qk_norm": "l1"}, "qk_norm must be one of"),
        ({"expand_k": 0.3}, r"hidden_size \* expand_k must be a positive integer"),
        ({"num_heads": 3}, "must split into num_heads = 3 heads"),
        ({"num_heads": 1, "expand_v": 9.0}, "heads of 1 to 256 dims"),
        ({"conv_size": 0}, "conv_size must be at least 1"),
        ({"step_backend": "cuda"}, "step_backend must be one of"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeltaNet(32, **{"num_heads": 2, **kwargs})


def test_bad_forward_arguments():
    layer = DeltaNet(HIDDEN, HEADS)
    x = torch.randn(2, 5, HIDDEN)
    _, cache = layer(x, use_cache=True)
    cases = [
        (lambda: layer(x[0]), ValueError, r"hidden_states must be \[B, T, hidden_size=32\]"),
        (lambda: layer(torch.randn(2, 5, 16)), ValueError, "hidden_size=32"),
        (lambda: layer(x.long()), TypeError, "hidden_states must be floating point"),
        (lambda: layer(x[:, :0]), ValueError, "at least one token"),
        (lambda: layer(x, attention_mask=torch.ones(2, 4)), ValueError, r"attention_mask must be \[B, T\] = \(2, 5\)"),
        (lambda: layer(x, attention_mask=torch.ones(10)), ValueError, "attention_mask must be a"),
        (lambda: layer(x, cache=(cache.recurrent_state, None)), TypeError, "cache must be a DeltaNetCache"),
        (lambda: layer(x[:1], cache=cache), ValueError, r"cache.recurrent_state must be \[B, H, K, V\] = \(1, 2, 16, 16\)"),
        (lambda: layer(x, cache=cache._replace(conv_state=None)), ValueError, "conv_state must hold"),
        (
            lambda: layer(x, cache=cache._replace(conv_state=(cache.conv_state[0][:, :1], *cache.conv_state[1:]))),
            ValueError,
            r"conv_state \(q\) must be \[B, conv_size - 1, D\] = \(2, 3, 32\)",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_cache_only_when_asked():
    layer = DeltaNet(HIDDEN, HEADS)
    x = torch.randn(1, 3, HIDDEN)
    assert layer(x)[1] is None
    cache = layer(x, use_cache=True)[1]
    assert isinstance(cache, DeltaNetCache) and cache.recurrent_state.dtype == torch.float32
    assert isinstance(layer(x[:, :1], cache=cache)[1], DeltaNetCache)
