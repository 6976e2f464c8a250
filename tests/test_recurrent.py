"""delta_rule_step against the float64 oracle: outputs, states, gradients, chained calls, checks."""

import pytest
import torch

from deltaflex import delta_rule_step
from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import TOLERANCES, make_inputs, relative_error


def _oracle(x, **kwargs):
    return recurrent_delta_rule_ref(**{n: t.double() for n, t in x.items()}, output_final_state=True, **kwargs)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keys", ["random", "correlated"])
def test_matches_oracle(device, T, dtype, keys):
    x = make_inputs(3, T, 2, 16, 24, dtype=dtype, device=device, keys=keys, initial_state=True)
    o, s = delta_rule_step(x["q"], x["k"], x["v"], x["beta"], x["initial_state"], scale=0.3)
    o_ref, s_ref = _oracle(x, scale=0.3)
    assert o.dtype == dtype and o.shape == o_ref.shape
    assert s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert relative_error(o, o_ref) < TOLERANCES[dtype]
    assert relative_error(s, s_ref) < TOLERANCES[dtype]


def test_token_by_token_equals_whole_sequence():
    x = make_inputs(2, 30, 2, 16, 8, dtype=torch.float32, initial_state=True)
    o_ref, s_ref = _oracle(x)
    state, outputs = x["initial_state"], []
    for t in range(30):
        o, state = delta_rule_step(*(x[n][:, t : t + 1] for n in ("q", "k", "v", "beta")), state)
        outputs.append(o)
    assert relative_error(torch.cat(outputs, dim=1), o_ref) < 1e-5
    assert relative_error(state, s_ref) < 1e-5


def test_no_state_means_zeros_and_input_state_is_untouched():
    x = make_inputs(2, 4, 2, 8, dtype=torch.float32, initial_state=True)
    o, _ = delta_rule_step(x["q"], x["k"], x["v"], x["beta"])
    assert relative_error(o, recurrent_delta_rule_ref(x["q"], x["k"], x["v"], x["beta"])[0]) < 1e-5
    state = x["initial_state"].clone()
    _, new = delta_rule_step(x["q"], x["k"], x["v"], x["beta"], state)
    assert torch.equal(state, x["initial_state"]) and not torch.equal(new, state)


def test_l2norm_in_step():
    x = make_inputs(2, 2, 2, 16, dtype=torch.float32, initial_state=True)
    x["q"], x["k"] = 3 * x["q"], 0.5 * x["k"] + 0.2 * torch.randn_like(x["k"])
    o, s = delta_rule_step(x["q"], x["k"], x["v"], x["beta"], x["initial_state"], use_qk_l2norm=True)
    o_ref, s_ref = _oracle(x, use_qk_l2norm=True)
    assert relative_error(o, o_ref) < 1e-5 and relative_error(s, s_ref) < 1e-5


def test_gradients_match_oracle():
    x = make_inputs(2, 3, 2, 8, 4, dtype=torch.float64, initial_state=True)
    ours = {n: t.clone().requires_grad_() for n, t in x.items()}
    refs = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, s = delta_rule_step(ours["q"], ours["k"], ours["v"], ours["beta"], ours["initial_state"])
    o_ref, s_ref = recurrent_delta_rule_ref(**refs, output_final_state=True)
    do, ds = torch.randn_like(o), torch.randn_like(s)
    ((o * do).sum() + (s * ds).sum()).backward()
    ((o_ref * do).sum() + (s_ref * ds).sum()).backward()
    for n in x:
        assert relative_error(ours[n].grad, refs[n].grad) < 1e-10, n


@pytest.mark.compile
def test_compiled_fullgraph_equals_oracle(device):
    torch._dynamo.reset()
    x = make_inputs(2, 1, 2, 16, 8, dtype=torch.float32, device=device, initial_state=True)
    step = torch.compile(lambda q, k, v, beta, s: delta_rule_step(q, k, v, beta, s), fullgraph=True)
    o, s = step(x["q"], x["k"], x["v"], x["beta"], x["initial_state"])
    o_ref, s_ref = _oracle(x)
    assert relative_error(o, o_ref) < 1e-5 and relative_error(s, s_ref) < 1e-5


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x: x.update(state=x["state"][:, :1]), r"initial_state must be \[N, H, K, V\]"),
        (lambda x: x.update(state=x["state"].to(torch.int32)), "initial_state must have a floating dtype"),
        (lambda x: x.update(v=x["v"][:, :, :1]), r"v must be \[B, T, H, V\]"),
        (lambda x: x.update(beta=x["beta"][:, :, None]), r"beta must be \[B, T, H\]"),
        (lambda x: x.update(k=x["k"].double()), "k must have q's dtype"),
    ],
)
def test_bad_inputs_raise_before_compute(change, message):
    x = make_inputs(2, 1, 2, 8, dtype=torch.float32, initial_state=True)
    args = {"q": x["q"], "k": x["k"], "v": x["v"], "beta": x["beta"], "state": x["initial_state"]}
    change(args)
    with pytest.raises((ValueError, TypeError), match=message):
        delta_rule_step(args["q"], args["k"], args["v"], args["beta"], args["state"])


def test_unknown_backend_raises():
    x = make_inputs(1, 1, 2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend must be None or one of"):
        delta_rule_step(x["q"], x["k"], x["v"], x["beta"], backend="cuda")


def test_default_step_backend():
    from deltaflex.recurrent import default_step_backend

    assert default_step_backend("cpu", torch.float32, False) == "eager"
    assert default_step_backend("cuda", torch.bfloat16, False) == "triton"  # decoding: one launch a step
    assert default_step_backend("cuda", torch.bfloat16, True) == "compiled"  # the kernel has no backward
    assert default_step_backend("cuda", torch.float64, False) == "compiled"  # the kernel takes no float64
