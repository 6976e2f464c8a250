"""torch.compile(fullgraph=True) through plans with Triton stages: a graph break raises. On a GPU the
kernels are triton_ops that Inductor traces into; in the CPU interpreter they are opaque custom ops
with fake implementations, which is what Dynamo needs to trace them without running them."""

import pytest
import torch

from deltaflex import delta_rule
from deltaflex.testing import make_inputs, relative_error

pytestmark = pytest.mark.compile
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Inductor on a GPU; on the CPU, Dynamo and AOTAutograd without Inductor's (slow, C++) code
# generation: a graph break or a missing fake implementation fails there just the same.
BACKEND = "inductor" if DEVICE == "cuda" else "aot_eager"


def _loss(q, k, v, beta, initial_state, plan):
    o, s = delta_rule(q, k, v, beta, initial_state=initial_state, output_final_state=True, chunk_size=16, plan=plan)
    return (o.float() ** 2).sum() + s.sum()


def _grads(fn, x):
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    loss = fn(**leaves)
    loss.backward()
    return loss, {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("plan", ["triton", "mixed-state"])
def test_fullgraph_compile_of_a_function_calling_a_triton_plan(plan):
    torch._dynamo.reset()
    x = make_inputs(1, 40, 2, 16, 8, dtype=torch.float32, device=DEVICE, initial_state=True)
    compiled = torch.compile(lambda **t: _loss(**t, plan=plan), fullgraph=True, backend=BACKEND)
    loss, grads = _grads(compiled, x)
    loss_ref, grads_ref = _grads(lambda **t: _loss(**t, plan="eager"), x)
    assert relative_error(loss, loss_ref) < 1e-5
    for n in grads:
        assert relative_error(grads[n], grads_ref[n]) < 1e-4, n


def test_triton_plan_under_dynamic_shapes():
    """A caller's graph with a symbolic T: the Triton plan reads its tensors as they are (the ops'
    chunk count an expression of T), and one graph serves two sequence lengths."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(BACKEND)(gm, example_inputs)

    compiled = torch.compile(lambda **t: _loss(**t, plan="triton"), fullgraph=True, backend=counting_backend,
                             dynamic=True)
    for T in (40, 57):
        x = make_inputs(1, T, 2, 16, 8, dtype=torch.float32, device=DEVICE, initial_state=True)
        loss, grads = _grads(compiled, x)
        loss_ref, grads_ref = _grads(lambda **t: _loss(**t, plan="eager"), x)
        assert relative_error(loss, loss_ref) < 1e-5, T
        for n in grads:
            assert relative_error(grads[n], grads_ref[n]) < 1e-4, (T, n)
    assert len(graphs) == 1
