"""ShortConvolution against F.conv1d in float64; a sequence fed in pieces equals the whole."""

import pytest
import torch
import torch.nn.functional as F

from deltaflex.layers.conv import ShortConvolution
from deltaflex.testing import relative_error


def _conv1d_ref(conv, x):
    """Causal depthwise convolution from zeros by F.conv1d, float64."""
    W = conv.kernel_size
    bias = None if conv.bias is None else conv.bias.double()
    y = F.conv1d(x.double().transpose(1, 2), conv.weight.double(), bias, padding=W - 1, groups=x.shape[-1])
    y = y[..., : x.shape[1]].transpose(1, 2)
    return F.silu(y) if conv.activation == "silu" else y


@pytest.mark.parametrize("kernel_size", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_matches_conv1d(kernel_size, bias, activation):
    conv = ShortConvolution(12, kernel_size, bias=bias, activation=activation).double()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    y, state = conv(x)
    assert relative_error(y, _conv1d_ref(conv, x)) < 1e-12
    assert state.shape == (2, kernel_size - 1, 12)
    assert torch.equal(state, x[:, 9 - (kernel_size - 1) :])


@pytest.mark.parametrize("splits", [(1, 1, 1, 1, 1, 1, 1), (2, 5), (3, 1, 3), (6, 1)])
def test_pieces_equal_whole(splits):
    conv = ShortConvolution(8, 4, bias=True)
    x = torch.randn(3, sum(splits), 8)
    y_whole, state_whole = conv(x)
    pieces, state, start = [], None, 0
    for n in splits:
        y, state = conv(x[:, start : start + n], state)
        pieces.append(y)
        start += n
    assert relative_error(torch.cat(pieces, dim=1), y_whole) < 1e-6
    assert torch.equal(state, state_whole)


def test_bfloat16_accumulates_in_float32():
    conv = ShortConvolution(16, 4).bfloat16()
    x = torch.randn(2, 20, 16).bfloat16()
    y, state = conv(x)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    assert relative_error(y, _conv1d_ref(conv, x)) < 1e-2


def test_gradients_match_conv1d():
    conv = ShortConvolution(6, 3, bias=True).double()
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 7, 6, dtype=torch.float64)
    (conv(x)[0] * dy).sum().backward()
    grads = [t.grad.clone() for t in (x, conv.weight, conv.bias)]
    for t in (x, conv.weight, conv.bias):
        t.grad = None
    (_conv1d_ref(conv, x) * dy).sum().backward()
    for ours, ref in zip(grads, (x.grad, conv.weight.grad, conv.bias.grad)):
        assert relative_error(ours, ref) < 1e-12


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        ShortConvolution(4, 4, activation="gelu")
    with pytest.raises(ValueError, match="kernel_size must be at least 1"):
        ShortConvolution(4, 0)
