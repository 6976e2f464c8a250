"""The autograd.Function: gradcheck of the hand-written backward, and what it keeps for backward."""

import pytest
import torch

from deltaflex import delta_rule
from deltaflex.testing import make_inputs


@pytest.mark.parametrize("use_qk_l2norm", [False, True])
def test_gradcheck(use_qk_l2norm):
    # two chunks, the second ragged; tiny so that the full (not the fast) check runs in seconds
    x = make_inputs(1, 19, 1, 3, 2, dtype=torch.float64, keys="correlated", initial_state=True)
    inputs = tuple(t.requires_grad_() for t in x.values())

    def f(q, k, v, beta, h0):
        return delta_rule(
            q, k, v, beta, initial_state=h0, output_final_state=True, chunk_size=16, scale=0.8,
            use_qk_l2norm=use_qk_l2norm, plan="eager",
        )

    assert torch.autograd.gradcheck(f, inputs, atol=1e-8, rtol=1e-6)


def _saved_bytes_beyond_inputs(fn, inputs):
    storages = {t.untyped_storage().data_ptr() for t in inputs}
    extra = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in storages:
            extra.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(extra)


@pytest.mark.parametrize("use_qk_l2norm", [False, True])
def test_backward_keeps_no_chunk_states(use_qk_l2norm):
    B, T, H, K, V, C = 2, 256, 2, 32, 32, 16
    x = make_inputs(B, T, H, K, V, dtype=torch.float32, initial_state=True)
    inputs = tuple(t.requires_grad_() for t in x.values())
    bound = B * T * H * C * 4  # O(B T H C) floats, e.g. the inverses T of every chunk
    chunk_states = B * (T // C) * H * K * V * 4
    assert chunk_states > bound  # so saving the per-chunk states would fail this test

    def f(q, k, v, beta, h0):
        return delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True, chunk_size=C,
                          use_qk_l2norm=use_qk_l2norm, plan="eager")

    assert _saved_bytes_beyond_inputs(f, inputs) <= bound
