import pytest
import torch

from deltaflex.chunk.state import affine_scan


def _naive(p, r, x0, reverse, transpose):
    N = p.shape[2]
    x, entering = x0, [None] * N
    for n in reversed(range(N)) if reverse else range(N):
        entering[n] = x
        pn = p[:, :, n].transpose(-1, -2) if transpose else p[:, :, n]
        x = (torch.eye(p.shape[-1], dtype=p.dtype) - pn) @ x + r[:, :, n]
    return torch.stack(entering, 2), x


@pytest.mark.parametrize("impl", ["loop", "scan"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_affine_scan(impl, reverse, transpose):
    p = 0.3 * torch.randn(2, 3, 5, 4, 4, dtype=torch.float64)
    r = torch.randn(2, 3, 5, 4, 6, dtype=torch.float64)
    x0 = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    entering, final = affine_scan(p, r, x0, reverse=reverse, transpose=transpose, impl=impl)
    ref_entering, ref_final = _naive(p, r, x0, reverse, transpose)
    torch.testing.assert_close(entering, ref_entering)
    torch.testing.assert_close(final, ref_final)


def test_affine_scan_accepts_an_expanded_initial_carry():
    # The gradient of `final_state.sum()` arrives expanded (stride 0); scan must not misread it.
    p, r = torch.randn(1, 1, 3, 2, 2), torch.randn(1, 1, 3, 2, 2)
    x0 = torch.ones(()).expand(1, 1, 2, 2)
    torch.testing.assert_close(
        affine_scan(p, r, x0, impl="scan")[1], affine_scan(p, r, x0.contiguous(), impl="loop")[1]
    )


def test_affine_scan_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        affine_scan(torch.zeros(1, 1, 1, 2, 2), torch.zeros(1, 1, 1, 2, 2), torch.zeros(1, 1, 2, 2), impl="nope")
