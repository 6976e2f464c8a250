"""Depthwise causal short convolution with a state, for prefill and token-by-token decoding.

y_t = act(sum_i w_i * x_{t - W + 1 + i} + bias), per channel, W = kernel_size. The state is the last
W - 1 inputs, [B, W - 1, D] (zeros at the start of a sequence), so a sequence cut anywhere and fed
piece by piece gives the same outputs as the whole. Computed as W shifted multiply-adds on
[B, T, D]: no transposes, and Inductor fuses it with the activation and whatever follows.
Parameters use nn.Conv1d's layout and fla's names (weight [D, 1, W], bias [D]).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = (None, "silu")


class ShortConvolution(nn.Module):
    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: str | None = "silu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be at least 1, got {kernel_size}")
        self.hidden_size, self.kernel_size, self.activation = hidden_size, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(hidden_size, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(hidden_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Conv1d's default initialisation (fan-in = kernel_size for a depthwise convolution)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.kernel_size)
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, kernel_size={self.kernel_size}, bias={self.bias is not None}, activation={self.activation}"

    def initial_state(self, batch_size: int, dtype: torch.dtype, device) -> torch.Tensor:
        return torch.zeros(batch_size, self.kernel_size - 1, self.hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D], state [B, W - 1, D] or None -> (y [B, T, D] in x's dtype, new state [B, W - 1, D])."""
        B, T, D = x.shape
        if state is None:
            state = self.initial_state(B, x.dtype, x.device)
        padded = torch.cat([state.to(x.dtype), x], dim=1)  # [B, T + W - 1, D]
        acc = torch.promote_types(x.dtype, torch.float32)  # accumulate in float32 at least
        w = self.weight[:, 0, :].to(acc)  # [D, W]
        y = sum(padded[:, i : i + T].to(acc) * w[:, i] for i in range(self.kernel_size))
        if self.bias is not None:
            y = y + self.bias.to(acc)
        if self.activation == "silu":
            y = F.silu(y)
        return y.to(x.dtype), padded[:, T:].clone()  # a copy: a view would keep `padded` alive
