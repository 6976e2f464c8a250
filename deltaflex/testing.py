"""Inputs and error measures shared by the tests, the benchmark and the tuner's correctness check."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KEY_KINDS = ("random", "correlated")

# ||out - ref|| / ||ref|| against the float64 oracle (DESIGN.md)
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    out, ref = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(out.shape)} vs {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def rounding_excess(out: torch.Tensor, ref: torch.Tensor) -> float:
    """How far a low-precision ``out`` lies from a float32 ``ref`` beyond rounding ``ref`` to out's dtype.

    Each element may differ by half a unit in the last place of out's dtype; the largest excess over
    that, relative to max(|ref|, rms(ref)), is what the two computations disagree on before rounding.
    A norm of the rounded difference would instead count every element whose rounding flipped."""
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(out.shape)} vs {tuple(ref.shape)}")
    finfo = torch.finfo(out.dtype)
    mantissa_bits = round(-math.log2(finfo.eps))  # 7 for bfloat16, 10 for float16
    out, ref = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    if not torch.isfinite(out).all():
        return float("inf")
    # x = m * 2**e with 0.5 <= |m| < 1: an ulp of out's dtype there is 2**(e - 1 - mantissa_bits); the
    # larger of |out| and |ref| sets the binade, as rounding up may cross into the next one
    larger = torch.maximum(out.abs(), ref.abs())
    half_ulp = torch.ldexp(torch.ones_like(ref), torch.frexp(larger).exponent - mantissa_bits - 2)
    half_ulp = half_ulp.clamp_min(finfo.tiny * finfo.eps / 2)  # subnormals are evenly spaced
    scale = ref.abs().clamp_min(ref.pow(2).mean().sqrt().clamp_min(1e-300))
    return ((out - ref).abs().sub(half_ulp).clamp_min(0) / scale).max().item()


def make_inputs(
    B: int,
    T: int,
    H: int,
    K: int,
    V: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    keys: str = "random",
    initial_state: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Fresh inputs for the delta rule: q, v ~ N(0, 1); k L2-normalised.

    keys="random": independent keys, beta = sigmoid(randn).
    keys="correlated": every key is one shared direction plus 10% noise and beta is near 1 (0.95-1):
    the case where a careless triangular inverse loses all precision.
    """
    V = K if V is None else V
    if keys not in KEY_KINDS:
        raise ValueError(f"keys must be one of {KEY_KINDS}, got {keys!r}")

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, device=device)

    k = randn(B, T, H, K)
    if keys == "correlated":
        k = randn(1, 1, H, K) + 0.1 * k
        beta = 0.95 + 0.05 * torch.rand(B, T, H, generator=generator, dtype=torch.float64, device=device)
    else:
        beta = randn(B, T, H).sigmoid()
    out = {
        "q": randn(B, T, H, K).to(dtype),
        "k": F.normalize(k, dim=-1).to(dtype),
        "v": randn(B, T, H, V).to(dtype),
        "beta": beta.to(dtype),
    }
    if initial_state:
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        out["initial_state"] = randn(B, H, K, V).to(state_dtype)
    return out
