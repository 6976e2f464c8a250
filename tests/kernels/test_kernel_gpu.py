"""The Triton plans on the GPU at the benchmark shapes of DESIGN.md (bf16, d_model 2048, 16K tokens a
batch): outputs and final state against the float64 oracle, gradients against the float64 eager
plan (itself tested against the oracle's gradients; autograd through the oracle's token loop at
this size would need tens of GB), each within the bf16 bound. Every stage kernel against its
compiled stage at one benchmark shape, with poisoned outputs."""

import pytest
import torch

from deltaflex import Plan, delta_rule
from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import TOLERANCES, make_inputs, relative_error

pytestmark = pytest.mark.gpu

BENCH_SHAPES = [  # B, T, H, D
    (8, 2048, 32, 64), (4, 4096, 32, 64), (2, 8192, 32, 64),
    (8, 2048, 16, 128), (4, 4096, 16, 128), (2, 8192, 16, 128),
    (8, 2048, 8, 256), (4, 4096, 8, 256), (2, 8192, 8, 256),
]
NAMES = ("q", "k", "v", "beta")


def _check_plan(x, plan, chunk_size=64):
    torch.manual_seed(0)
    do = torch.randn_like(x["v"])
    o_ref, s_ref = recurrent_delta_rule_ref(**x, output_final_state=True)
    refs = [x[n].detach().double().requires_grad_() for n in NAMES]
    delta_rule(*refs, plan="eager", chunk_size=chunk_size)[0].backward(do.double())
    leaves = [x[n].detach().clone().requires_grad_() for n in NAMES]
    o, s = delta_rule(*leaves, output_final_state=True, chunk_size=chunk_size, plan=plan)
    o.backward(do)
    errors = {"o": relative_error(o, o_ref), "final_state": relative_error(s, s_ref)}
    errors.update({f"d{n}": relative_error(leaf.grad, ref.grad) for n, leaf, ref in zip(NAMES, leaves, refs)})
    bad = {n: e for n, e in errors.items() if not e <= TOLERANCES[torch.bfloat16]}
    assert not bad, f"relative errors over the bf16 bound: {bad}"
    return errors


@pytest.mark.parametrize("shape", BENCH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_plan_at_benchmark_shapes(shape):
    B, T, H, D = shape
    _check_plan(make_inputs(B, T, H, D, dtype=torch.bfloat16, device="cuda"), "triton")


@pytest.mark.parametrize("plan", [
    "mixed-state",
    Plan(solve="triton", wy="triton", state="triton", output="triton"),  # compiled glue around the kernels
    Plan(solve="triton", wy="triton", state="triton", output="triton", compile=False, chunk_size=128),
    Plan(solve="triton", wy="triton", state="triton", output="triton", compile=False, precision="bf16"),
], ids=["mixed-state", "triton-compiled-glue", "triton-C128", "triton-bf16"])
def test_other_triton_plans_at_one_benchmark_shape(plan):
    _check_plan(make_inputs(4, 4096, 16, 128, dtype=torch.bfloat16, device="cuda"), plan)


@pytest.mark.parametrize("D", [64, 128, 256])
def test_triton_plan_with_correlated_keys(D):
    x = make_inputs(2, 1000, 2048 // D // 4, D, dtype=torch.bfloat16, device="cuda", keys="correlated",
                    initial_state=True)
    x.pop("initial_state")
    _check_plan(x, "triton")


@pytest.mark.parametrize("D", [64, 128, 256])
def test_every_stage_kernel_at_a_benchmark_shape(poisoned, D):
    from test_kernel_stages import STAGE_TOL, _compare_every_stage, _stage_inputs

    for keys in ("random", "correlated"):
        x = _stage_inputs((2, 2048 // D, 1024, D, D, 64), torch.bfloat16, "bf16x3", keys)
        _compare_every_stage(x, STAGE_TOL["bf16x3"])
