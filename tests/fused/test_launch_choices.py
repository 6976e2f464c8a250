"""chunk.py's choices of launches from the shape and the GPU (no kernel runs): where the forward's
state pass writes the output, and where the state passes take narrower value blocks."""

import pytest
import torch

pytest.importorskip("triton")
from deltaflex.fused import chunk as fused  # noqa: E402


def test_where_the_state_pass_writes_the_output(monkeypatch):
    """Where its walk's longer steps cost less than output.py's kernel: on a GPU of 132 SMs (value
    blocks 64 wide), the H200's cases; never at head dim 256."""
    monkeypatch.setattr(fused, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")

    def in_state(B, T, H, D, G=0):  # chunks of 64; G: the two-level pass's segments of G chunks (B = 1)
        rows, steps = (B * H, T // 64) if not G else (T // 64 // G * H, G)
        return fused._output_in_state(D, D, rows, steps, B * T * H, cuda)

    assert in_state(4, 4096, 16, 128)  # 128 programs, one wave of 64 steps
    assert in_state(8, 2048, 16, 128)  # two waves of 32
    assert not in_state(2, 8192, 16, 128)  # one wave of 128
    assert in_state(4, 4096, 32, 64)
    assert in_state(2, 8192, 32, 64)  # one wave of 128, but head dim 64's steps lengthen little
    assert in_state(1, 65536, 8, 128, G=128) and in_state(1, 32768, 8, 128, G=64)  # prefill
    assert not in_state(1, 65536, 8, 128)  # one-level: 16 programs walking 1024 chunks
    assert not in_state(4, 4096, 8, 256)
    # off CUDA (the interpreter) one wave, however many programs: 64 waves of 64 steps on the GPU
    assert fused._output_in_state(128, 128, 64 * 64, 64, 4 * 4096 * 16, torch.device("cpu"))
    assert not fused._output_in_state(128, 128, 64 * 64, 64, 4 * 4096 * 16, cuda)


def test_narrow_state_blocks_where_few_programs(monkeypatch):
    monkeypatch.setattr(fused, "sm_count", lambda device: 132)
    monkeypatch.setattr(fused, "INTERPRETED", False)  # (the interpreter launches one value block)
    cuda = torch.device("cuda")
    for kernel in ("state_fwd", "state_bwd"):
        assert fused._state_opts(kernel, 256, 256, 2 * 8, cuda)["BV"] == 32  # 64 programs at 64 wide: 128 at 32
        assert fused._state_opts(kernel, 256, 256, 4 * 8, cuda)["BV"] == 64  # 256 at 32 wide: two waves
        assert fused._state_opts(kernel, 128, 128, 2 * 16, cuda)["BV"] == 32
        assert fused._state_opts(kernel, 128, 128, 4 * 16, cuda)["BV"] == 64
    assert fused._state_opts("state_fwd", 64, 64, 2 * 32, cuda)["BV"] == 32
    assert fused._state_opts("state_bwd", 64, 64, 2 * 32, cuda)["BV"] == 32  # the table's already
    assert fused._state_fwd_opts(True, 128, 128, 2 * 16, cuda)["BV"] == 64  # never the pass writing the output
    monkeypatch.setattr(fused, "NARROW_STATE_WHEN_FEW", False)
    assert fused._state_opts("state_fwd", 256, 256, 2 * 8, cuda)["BV"] == 64
