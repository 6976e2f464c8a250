"""torch.compile paths at a tiny shape: plan="compiled", and delta_rule inside a caller's
torch.compile(fullgraph=True) (a graph break there raises). On CPU each graph costs tens of seconds
to compile, so there are few."""

import pytest
import torch

from deltaflex import Plan, delta_rule
from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import make_inputs, relative_error

pytestmark = pytest.mark.compile


def _inputs(device):
    return make_inputs(1, 40, 2, 16, 8, dtype=torch.float32, device=device, initial_state=True)


def _loss(q, k, v, beta, initial_state, plan):
    o, s = delta_rule(q, k, v, beta, initial_state=initial_state, output_final_state=True, chunk_size=16, plan=plan)
    # s.sum() hands backward an expanded (stride-0) gradient, which once tripped the compiled scan
    return (o * o).sum() + s.sum()


def _grads(fn, x):
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    loss = fn(**leaves)
    loss.backward()
    return loss, {n: t.grad for n, t in leaves.items()}


def _assert_matches_eager(fn, x):
    loss, grads = _grads(fn, x)
    loss_ref, grads_ref = _grads(lambda **t: _loss(**t, plan="eager"), x)
    assert relative_error(loss, loss_ref) < 1e-5
    for n in grads:
        assert relative_error(grads[n], grads_ref[n]) < 1e-5, n
    # and the eager plan itself against the oracle, so "equals eager" means "is right"
    o, _ = recurrent_delta_rule_ref(**x)
    assert relative_error(delta_rule(**x, chunk_size=16, plan="eager")[0], o) < 1e-4


def test_compiled_plan_equals_eager(device):
    # a two-level state pass (two scans), over a padded chunk count (40 rows: 3 chunks -> 4)
    _assert_matches_eager(lambda **t: _loss(**t, plan=Plan(state_group=2)), _inputs(device))


def test_inside_callers_fullgraph_compile(device):
    torch._dynamo.reset()
    compiled = torch.compile(lambda **t: _loss(**t, plan=None), fullgraph=True)
    _assert_matches_eager(compiled, _inputs(device))
