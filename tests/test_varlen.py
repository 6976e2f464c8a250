"""Packed sequences (cu_seqlens) and chunked prefill, against the float64 oracle."""

import pytest
import torch

from deltaflex import Plan, chunk_delta_rule, delta_rule
from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import TOLERANCES, make_inputs, relative_error


def _packed(lengths, dtype, keys="random", K=16, V=8, device="cpu"):
    x = make_inputs(1, sum(lengths), 2, K, V, dtype=dtype, keys=keys, device=device)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x["initial_state"] = torch.randn(len(lengths), 2, K, V, dtype=state_dtype, device=device)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    return x, cu


def _check(x, cu, plan, chunk_size=16, cu_seqlens_cpu=None):
    tol = TOLERANCES[x["q"].dtype]
    ours = {n: t.clone().requires_grad_() for n, t in x.items()}
    refs = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    o, s = delta_rule(**ours, cu_seqlens=cu, cu_seqlens_cpu=cu_seqlens_cpu, output_final_state=True,
                      chunk_size=chunk_size, plan=plan)
    o_ref, s_ref = recurrent_delta_rule_ref(**refs, cu_seqlens=cu, output_final_state=True)
    do, ds = torch.randn_like(o_ref), torch.randn_like(s_ref)
    ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
    ((o_ref * do).sum() + (s_ref * ds).sum()).backward()
    errors = {"o": relative_error(o, o_ref), "final_state": relative_error(s, s_ref)}
    errors.update({f"d{n}": relative_error(ours[n].grad, refs[n].grad) for n in ours})
    assert max(errors.values()) <= tol, errors


LENGTHS = [[5, 0, 1, 17], [40], [3, 33, 16, 0, 9], [1, 1, 1], [0, 20]]


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("state_group", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packed_equals_the_oracle(lengths, state_group, dtype):
    x, cu = _packed(lengths, dtype, keys="correlated")
    _check(x, cu, Plan(compile=False, state_group=state_group))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_half_precision(dtype):
    x, cu = _packed([7, 30, 0, 64], dtype)
    _check(x, cu, Plan(compile=False), chunk_size=32, cu_seqlens_cpu=cu.cpu())


def test_packed_equals_separate_runs():
    lengths = [9, 0, 25, 3]
    x, cu = _packed(lengths, torch.float64)
    o, s = delta_rule(**x, cu_seqlens=cu.int(), output_final_state=True, chunk_size=16)
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if end == start:
            torch.testing.assert_close(s[i], x["initial_state"][i])
            continue
        part = {n: t[:, start:end] for n, t in x.items() if n != "initial_state"}
        o_i, s_i = delta_rule(**part, initial_state=x["initial_state"][i : i + 1], output_final_state=True,
                              chunk_size=16)
        torch.testing.assert_close(o[:, start:end], o_i)
        torch.testing.assert_close(s[i : i + 1], s_i)


@pytest.mark.parametrize("splits", [[1], [16], [17, 40], [5, 6, 7, 64]], ids=str)
def test_chunked_prefill_equals_one_run(splits):
    x = make_inputs(2, 80, 2, 16, 8, dtype=torch.float64, initial_state=True)
    o, s = delta_rule(**x, output_final_state=True, chunk_size=16)
    state, outs, bounds = x["initial_state"], [], [0, *splits, 80]
    for start, end in zip(bounds[:-1], bounds[1:]):
        part = {n: t[:, start:end] for n, t in x.items() if n != "initial_state"}
        o_part, state = delta_rule(**part, initial_state=state, output_final_state=True, chunk_size=16)
        outs.append(o_part)
    torch.testing.assert_close(torch.cat(outs, 1), o)
    torch.testing.assert_close(state, s)


def test_fla_names():
    x, cu = _packed([10, 22], torch.float32)
    o, s = chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], initial_state=x["initial_state"],
                            output_final_state=True, cu_seqlens=cu, cu_seqlens_cpu=cu, chunk_size=16)
    o_ref, s_ref = recurrent_delta_rule_ref(**x, cu_seqlens=cu, output_final_state=True)
    assert relative_error(o, o_ref) < 1e-4 and relative_error(s, s_ref) < 1e-4


def _bad(cu, B=1, **kwargs):
    x = make_inputs(B, 10, 2, 8, dtype=torch.float32)
    return delta_rule(**x, cu_seqlens=cu, **kwargs)


@pytest.mark.parametrize(
    "cu,kwargs,error,match",
    [
        (torch.tensor([[0, 10]]), {}, ValueError, "1-D"),
        (torch.tensor([0]), {}, ValueError, "1-D"),
        (torch.tensor([1, 10]), {}, ValueError, "start at 0"),
        (torch.tensor([0, 6, 4, 10]), {}, ValueError, "non-decreasing"),
        (torch.tensor([0, 9]), {}, ValueError, "end at T = 10"),
        (torch.tensor([0.0, 10.0]), {}, ValueError, "int32 or int64"),
        (torch.tensor([0, 10], device="meta"), {}, ValueError, "cu_seqlens is on meta"),
        (torch.tensor([0, 10]), {"cu_seqlens_cpu": torch.tensor([0, 4, 10])}, ValueError, "host copy"),
        ([0, 10], {}, TypeError, "cu_seqlens must be a torch.Tensor"),
    ],
)
def test_bad_cu_seqlens(cu, kwargs, error, match):
    with pytest.raises(error, match=match):
        _bad(cu, **kwargs)


def test_packing_needs_batch_one_and_a_state_per_sequence():
    with pytest.raises(ValueError, match="B = 1"):
        _bad(torch.tensor([0, 10]), B=2)
    with pytest.raises(ValueError, match="initial_state must be"):
        _bad(torch.tensor([0, 4, 10]), initial_state=torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        _bad(None, cu_seqlens_cpu=torch.tensor([0, 10]))


@pytest.mark.compile
def test_packed_compiled_plan():
    # the compiled graph with packed sequences, two levels (the most moving parts)
    x, cu = _packed([5, 0, 1, 17], torch.float32)
    _check(x, cu, Plan(state_group=2))
