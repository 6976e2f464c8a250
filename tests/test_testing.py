"""The error measures in deltaflex.testing that the other tests judge by."""

import pytest
import torch

from deltaflex.testing import relative_error, rounding_excess


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_excess_forgives_exactly_the_rounding(dtype):
    ref = torch.randn(64, 48) * 3
    ref[0, :4] = 0.0
    assert rounding_excess(ref.to(dtype), ref) == 0.0
    # a float32 disagreement of 1e-3 before rounding shows through, though most roundings agree
    shifted = ref + 1e-3 * ref.abs().max() * torch.sign(torch.randn_like(ref))
    excess = rounding_excess(shifted.to(dtype), ref)
    # (at most the shift over the smallest scale, rms(ref); 1% for the float32 sums of that bound)
    assert 1e-4 < excess <= 1.01e-3 * ref.abs().max() / ref.pow(2).mean().sqrt()


def test_rounding_excess_refuses_mismatched_shapes_and_flags_nan():
    ref = torch.randn(8)
    with pytest.raises(ValueError, match="shape mismatch"):
        rounding_excess(ref[:4].bfloat16(), ref)
    assert rounding_excess(torch.full((8,), float("nan")).bfloat16(), ref) == float("inf")
    assert relative_error(torch.full((8,), float("nan")), ref) == float("inf")
