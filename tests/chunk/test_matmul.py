import pytest
import torch

from deltaflex.chunk.matmul import dot, make_dot
from deltaflex.testing import relative_error

# ||a @ b - exact|| / ||exact|| when a float32 operand meets a bf16 one (the input's rounding is
# not counted: the bf16 operand is exact by definition)
BOUNDS = {"fp32": 1e-6, "bf16x3": 3e-5, "bf16": 1e-2}


@pytest.mark.parametrize("policy", ["fp32", "bf16x3", "bf16"])
@pytest.mark.parametrize("exact", ["none", "left", "right", "both"])
def test_policies(policy, exact):
    a = torch.randn(3, 2, 64, 48)
    b = torch.randn(3, 2, 48, 32)
    if exact in ("left", "both"):
        a = a.bfloat16()
    if exact in ("right", "both"):
        b = b.bfloat16()
    out = dot(a, b, policy, torch.bfloat16)
    assert out.dtype == torch.float32
    err = relative_error(out, a.double() @ b.double())
    assert err < (1e-6 if exact == "both" else BOUNDS[policy])
    if policy == "bf16" and exact != "both":
        assert err > 1e-4  # rounding really happened: this test can tell the policies apart


def test_float64_and_float32_inputs_stay_exact():
    a, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    torch.testing.assert_close(dot(a, b, "bf16", torch.float64), a @ b)
    assert dot(a.float(), b.float(), "bf16", torch.float32).dtype == torch.float32


def test_unknown_policy():
    with pytest.raises(ValueError, match="policy"):
        make_dot("tf32", torch.bfloat16)
