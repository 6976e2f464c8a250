"""The interpreter's bounds check (tests/interpreter_bounds.py) that every kernel test runs under."""

import os

import pytest
import torch
import triton
import triton.language as tl

from interpreter_bounds import OutOfBounds

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks Triton's CPU interpreter")


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    if MASKED:
        tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n), mask=offsets < n)
    else:
        tl.store(y_ptr + offsets, tl.load(x_ptr + offsets))


def test_masked_accesses_inside_the_tensors_pass():
    x = torch.randn(5)
    y = torch.empty(5)
    _copy_kernel[(1,)](x, y, 5, BLOCK=8, MASKED=True)
    assert torch.equal(x, y)


def test_a_read_past_the_end_fails():
    x, y = torch.randn(5), torch.empty(8)
    with pytest.raises(Exception) as info:  # the interpreter wraps it in its own error
        _copy_kernel[(1,)](x, y, 5, BLOCK=8, MASKED=False)
    assert "OutOfBounds" in repr(info.value) or isinstance(info.value, OutOfBounds)
    assert "load of 3 element(s)" in str(info.value)


def test_a_write_past_the_end_fails():
    x, y = torch.randn(8), torch.empty(5)
    with pytest.raises(Exception, match="store of 3 element"):
        _copy_kernel[(1,)](x, y, 5, BLOCK=8, MASKED=False)
