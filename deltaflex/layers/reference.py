"""A plain-PyTorch DeltaNet layer in float64 on the sequential oracle: the ground truth for the layer.

`deltanet_ref(layer, x)` reads a `DeltaNet`'s parameters (cast to float64; autograd flows back to
them and to x) and computes the layer with independent plain ops: F.conv1d for the short
convolution, `recurrent_delta_rule_ref` for the delta rule, explicit norms. Left padding is handled
the obvious way, by running each row on its real tokens only, so it checks the layer's masking
convention rather than repeating it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import l2norm, recurrent_delta_rule_ref

__all__ = ["deltanet_ref"]


def deltanet_ref(layer, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Returns float64 (output [B, T, hidden], final recurrent state [B, H, K, V],
    conv states (q, k, v) [B, conv_size - 1, D] or None). Padded output positions are zero."""
    x = hidden_states.to(torch.float64)
    B, T, _ = x.shape
    if attention_mask is None:
        return _unpadded(layer, x)
    out = x.new_zeros(B, T, layer.hidden_size)
    states, convs = [], []
    for b in range(B):
        real = attention_mask[b].bool()
        n = int(real.sum())
        if not real[T - n :].all():
            raise ValueError(f"row {b} of attention_mask is not left padding")
        o, state, conv = _unpadded(layer, x[b : b + 1, T - n :])
        out[b, T - n :] = o[0]
        states.append(state)
        convs.append(conv)
    conv_state = None if convs[0] is None else tuple(torch.cat(c) for c in zip(*convs))
    return out, torch.cat(states), conv_state


def _weight(param) -> torch.Tensor:
    return param.to(torch.float64)


def _short_conv(conv, x):
    """Causal depthwise convolution of x [1, T, D] from zeros, by F.conv1d; and the last W - 1 inputs."""
    W = conv.kernel_size
    bias = None if conv.bias is None else _weight(conv.bias)
    y = F.conv1d(x.transpose(1, 2), _weight(conv.weight), bias, padding=W - 1, groups=x.shape[-1])
    y = y[..., : x.shape[1]].transpose(1, 2)
    if conv.activation == "silu":
        y = y * torch.sigmoid(y)
    history = torch.cat([x.new_zeros(x.shape[0], W - 1, x.shape[-1]), x], dim=1)
    return y, history[:, history.shape[1] - (W - 1) :]


def _unpadded(layer, x):
    B, T, _ = x.shape
    H, K, V = layer.num_heads, layer.head_k_dim, layer.head_v_dim
    q, k, v = (x @ _weight(p.weight).T for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    conv_state = None
    if layer.use_short_conv:
        (q, cq), (k, ck), (v, cv) = (
            _short_conv(c, t) for c, t in ((layer.q_conv1d, q), (layer.k_conv1d, k), (layer.v_conv1d, v))
        )
        conv_state = (cq, ck, cv)
    else:
        if layer.qk_activation == "silu":
            q, k = q * torch.sigmoid(q), k * torch.sigmoid(k)
        v = v * torch.sigmoid(v)
    q, k, v = q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, H, V)
    feature_map = {
        "silu": lambda t: t,  # applied above
        "relu": lambda t: t.clamp_min(0),
        "elu": lambda t: torch.where(t > 0, t + 1, torch.exp(t)),
        "identity": lambda t: t,
    }[layer.qk_activation]
    q, k = feature_map(q), feature_map(k)
    if layer.qk_norm == "l2":
        q, k = l2norm(q), l2norm(k)
    else:
        q, k = (t / t.abs().sum(-1, keepdim=True).clamp_min(1e-6) for t in (q, k))
    if layer.use_beta:
        beta = torch.sigmoid(x @ _weight(layer.b_proj.weight).T)
        beta = 2 * beta if layer.allow_neg_eigval else beta
    else:
        beta = x.new_ones(B, T, H)
    o, state = recurrent_delta_rule_ref(q, k, v, beta, output_final_state=True)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps) * _weight(layer.o_norm.weight)
    if layer.use_gate:
        g = (x @ _weight(layer.g_proj.weight).T).reshape(B, T, H, V)
        o = o * g * torch.sigmoid(g)
    return o.reshape(B, T, H * V) @ _weight(layer.o_proj.weight).T, state, conv_state
