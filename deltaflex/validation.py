"""Argument checks for the public ops: every bad input fails here, before any compute, with the
argument's name and what was expected."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping

import torch

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
CHUNK_SIZES = (16, 32, 64, 128)
MAX_HEAD_DIM = 256


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrent states are float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _require_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a positive real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    return scale


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size!r}")
    return chunk_size


def check_delta_rule_inputs(q, k, v, beta, scale, initial_state, cu_seqlens) -> float:
    """Checks q [B, T, H, K], k [B, T, H, K], v [B, T, H, V], beta [B, T, H] and an optional
    initial_state [N, H, K, V]; returns the scale to use."""
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        _require_tensor(name, x)
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, T, H, K], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape [B, T, H, K] = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with [B, T, H] = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [B, T, H] = {tuple(q.shape[:3])}, got {tuple(beta.shape)}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if min(B, T, H, K, V) < 1:
        raise ValueError(f"q, k, v must be non-empty, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise ValueError(f"head dims must be at most {MAX_HEAD_DIM}, got K={K}, V={V}")

    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q must have a floating dtype in {SUPPORTED_DTYPES}, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    if beta.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"beta must have q's dtype {q.dtype} or float32, got {beta.dtype}")

    for name, x in (("k", k), ("v", v), ("beta", beta)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; all inputs must share a device")

    if cu_seqlens is not None:
        _check_cu_seqlens_shape(cu_seqlens)
    n_states = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is not None:
        _require_tensor("initial_state", initial_state)
        if initial_state.shape != (n_states, H, K, V):
            raise ValueError(
                f"initial_state must be [N, H, K, V] = {(n_states, H, K, V)} (N = "
                f"{'B' if cu_seqlens is None else 'number of sequences'}), got {tuple(initial_state.shape)}"
            )
        allowed = SUPPORTED_DTYPES if q.dtype == torch.float64 else SUPPORTED_DTYPES[:3]
        if initial_state.dtype not in allowed:
            raise TypeError(
                f"initial_state must have a floating dtype of at most {state_dtype(q.dtype)} precision "
                f"(states are kept in {state_dtype(q.dtype)}), got {initial_state.dtype}"
            )
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
    return check_scale(scale, K)


def _check_cu_seqlens_shape(cu_seqlens) -> None:
    _require_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be 1-D [N + 1] with N >= 1 sequences, got shape {tuple(cu_seqlens.shape)}")


def check_cu_seqlens(cu_seqlens, cu_seqlens_cpu, B: int, T: int, device) -> list[int]:
    """Checks packed-sequence boundaries [N + 1] (starting at 0, non-decreasing, ending at T, with
    B = 1) and returns the N lengths. Reading the values needs them on the host: `cu_seqlens_cpu`,
    a host copy, avoids the device sync that reading `cu_seqlens` would cost."""
    if cu_seqlens is None:
        raise ValueError("cu_seqlens_cpu is a host copy of cu_seqlens and needs cu_seqlens too")
    _check_cu_seqlens_shape(cu_seqlens)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if B != 1:
        raise ValueError(f"cu_seqlens packs sequences along T and needs batch size B = 1, got B = {B}")
    host = cu_seqlens if cu_seqlens_cpu is None else _require_tensor("cu_seqlens_cpu", cu_seqlens_cpu)
    if host.shape != cu_seqlens.shape or (cu_seqlens_cpu is not None and host.device.type != "cpu"):
        raise ValueError(f"cu_seqlens_cpu must be a host copy of cu_seqlens {tuple(cu_seqlens.shape)}, "
                         f"got {tuple(host.shape)} on {host.device}")
    bounds = [int(b) for b in host.tolist()]
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    if bounds[-1] != T:
        raise ValueError(f"cu_seqlens must end at T = {T}, got {bounds[-1]}")
    return [b - a for a, b in zip(bounds, bounds[1:])]


def check_hidden_states(x, hidden_size: int) -> None:
    """A token mixer's input: a floating-point [B, T, hidden_size] tensor with T >= 1."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != hidden_size:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"hidden_states must be [B, T, hidden_size={hidden_size}], got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"hidden_states must be floating point, got {x.dtype}")
    if x.shape[1] < 1:
        raise ValueError("hidden_states must hold at least one token (T >= 1)")


def config_fields(cls, data, what: str) -> dict:
    """The fields of a config dataclass `cls` read from `data` (a JSON object): TypeError for anything
    but a mapping, ValueError naming the fields `cls` does not have."""
    if not isinstance(data, Mapping):
        raise TypeError(f"a {what} is read from a dict (a JSON object), got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {what} fields {unknown}; expected some of {sorted(names)}")
    return dict(data)
