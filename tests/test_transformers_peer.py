"""transformers' torch fallback computes our delta rule on our inputs (so the benchmark compares the
same computation), and it is the fallback that runs. Skipped where transformers is not installed."""

import importlib

import pytest
import torch

from deltaflex import transformers_peer
from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import make_inputs, relative_error

pytest.importorskip("transformers")


@pytest.mark.parametrize("keys", ["random", "correlated"])
def test_fallback_agrees_with_the_oracle(keys):
    # float32 inputs, T not a multiple of its chunk of 64, K != V, an initial state
    x = make_inputs(2, 100, 3, 16, 8, dtype=torch.float32, keys=keys, initial_state=True)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, final = transformers_peer.delta_rule(*(leaves[n] for n in ("q", "k", "v", "beta")),
                                            initial_state=leaves["initial_state"], output_final_state=True)
    exact = {n: t.double().requires_grad_() for n, t in x.items()}
    o_ref, final_ref = recurrent_delta_rule_ref(**exact, output_final_state=True)
    assert o.dtype == torch.float32 and final.shape == (2, 3, 16, 8)
    assert relative_error(o, o_ref) < 1e-5
    assert relative_error(final, final_ref) < 1e-5
    do, dfinal = torch.randn_like(o_ref), torch.randn_like(final_ref)
    torch.autograd.backward((o, final), (do.float(), dfinal.float()))
    torch.autograd.backward((o_ref, final_ref), (do, dfinal))
    for name in x:
        assert relative_error(leaves[name].grad, exact[name].grad) < 1e-4, name


def test_fallback_normalises_q_and_k_as_we_do():
    x = make_inputs(1, 70, 2, 16, dtype=torch.float32)
    q, k = 3 * torch.randn_like(x["q"]), 0.5 * torch.randn_like(x["k"])
    o, _ = transformers_peer.delta_rule(q, k, x["v"], x["beta"], use_qk_l2norm=True)
    o_ref, _ = recurrent_delta_rule_ref(q.double(), k.double(), x["v"].double(), x["beta"].double(), use_qk_l2norm=True)
    assert relative_error(o, o_ref) < 1e-5


def test_it_is_the_torch_fallback_that_runs(monkeypatch):
    fn = transformers_peer.fallback()
    module = importlib.import_module(transformers_peer.MODULE)
    assert fn.__module__ == transformers_peer.MODULE and fn.__name__ == "torch_chunk_gated_delta_rule"
    assert fn is not getattr(module, "torch_chunk_gated_delta_rule")  # past transformers' dispatcher
    monkeypatch.setattr(transformers_peer, "fla_importable", lambda: True)
    assert "fla importable, bypassed" in transformers_peer.describe()
