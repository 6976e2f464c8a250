"""The compiled plan replayed under CUDA graphs (GPU only)."""

import pytest
import torch

from deltaflex import Plan, delta_rule
from deltaflex.chunk import graphs
from deltaflex.testing import make_inputs, relative_error

pytestmark = [pytest.mark.gpu, pytest.mark.compile]


def _run(x, plan):
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, s = delta_rule(**leaves, output_final_state=True, chunk_size=16, plan=plan)
    (o.square().sum() + s.sum()).backward()
    return o, s, {n: t.grad for n, t in leaves.items()}


def test_replays_equal_eager_and_outputs_survive_the_next_replay():
    plan = Plan(cuda_graph=True, state_group=2)
    first = make_inputs(2, 100, 2, 32, 16, dtype=torch.float32, device="cuda", initial_state=True)
    second = make_inputs(2, 100, 2, 32, 16, dtype=torch.float32, device="cuda", initial_state=True)
    o1, s1, g1 = _run(first, plan)
    o1_kept, s1_kept = o1.clone(), s1.clone()
    o2, s2, g2 = _run(second, plan)  # same signature: a replay with new data
    assert torch.equal(o1, o1_kept) and torch.equal(s1, s1_kept)
    for x, (o, s, g) in ((first, (o1, s1, g1)), (second, (o2, s2, g2))):
        o_ref, s_ref, g_ref = _run(x, "eager")
        assert relative_error(o, o_ref) < 1e-5 and relative_error(s, s_ref) < 1e-5
        assert all(relative_error(g[n], g_ref[n]) < 1e-5 for n in g)


def test_a_new_length_is_a_new_capture_not_a_recompile():
    plan = Plan(cuda_graph=True)
    # 130 and 200 tokens: 3 and 4 chunks (a first call with one chunk would specialise on it, as
    # torch.compile does for every size-1 dimension, and the next length would recompile once)
    _run(make_inputs(1, 130, 2, 16, dtype=torch.float32, device="cuda"), plan)
    captures = len(graphs._captures)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    o, _, _ = _run(x := make_inputs(1, 200, 2, 16, dtype=torch.float32, device="cuda"), plan)
    assert len(graphs._captures) == captures + 2  # forward and backward
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before
    assert relative_error(o, _run(x, "eager")[0]) < 1e-5
