"""The fused forward's two-level state pass (deltaflex/fused/segments.py) against the float64 oracle:
o and the final state on random and correlated keys, ragged and packed sequences (some shorter than
a segment, some empty), initial and final states; its error no worse than the one-level pass's on the
same inputs; gradients through it (training's forward); the automatic choice; the layer's prefill.
Without a GPU the kernels run in Triton's interpreter at tiny sizes."""

import dataclasses

import pytest
import torch
from test_fused import poisoned  # noqa: F401  (every buffer the launches write starts as NaN)
from test_varlen import _packed

from deltaflex import delta_rule
from deltaflex.fused import segments
from deltaflex.plan import NAMED_PLANS, Plan, plan_from_spec
from deltaflex.reference import recurrent_delta_rule_ref
from deltaflex.testing import TOLERANCES, make_inputs, relative_error

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = NAMED_PLANS["fused"]
ONE_LEVEL = dataclasses.replace(FUSED, state_segment=1)


def two_level(G: int) -> Plan:
    return dataclasses.replace(FUSED, state_segment=G)


def _errors(x, plan, chunk_size, cu=None):
    """Relative errors of o and the final state against the oracle, forward only (inference)."""
    with torch.inference_mode():
        o, s = delta_rule(**x, output_final_state=True, chunk_size=chunk_size, cu_seqlens=cu, plan=plan)
    o_ref, s_ref = recurrent_delta_rule_ref(**{n: t.double() for n, t in x.items()}, cu_seqlens=cu,
                                            output_final_state=True)
    return relative_error(o, o_ref), relative_error(s, s_ref)


def _check_against_one_level(x, G, chunk_size, cu=None):
    tol = TOLERANCES[x["q"].dtype]
    ours, one = _errors(x, two_level(G), chunk_size, cu), _errors(x, ONE_LEVEL, chunk_size, cu)
    assert max(ours) <= tol, ours
    # no worse than the one-level pass (the same walk per segment; only the start states differ), up to
    # the spread of rounding in the other half of the result
    assert ours[0] <= 1.1 * one[0] and ours[1] <= 1.25 * one[1] + 1e-5, (ours, one)


@pytest.mark.parametrize("shape", [  # B, T, H, K, V, chunk size, G, keys
    (1, 150, 1, 32, 16, 16, 2, "correlated"),  # a ragged last segment and chunk
    (1, 100, 2, 48, 24, 32, 2, "random"),  # head dims that are not powers of two
    (1, 384, 1, 16, 16, 16, 4, "correlated"),  # long T: 6 segments of 4 chunks
    (1, 256, 1, 16, 16, 16, 4, "random"),
], ids=lambda s: "x".join(map(str, s)))
def test_matches_the_oracle_and_the_one_level_pass(shape):
    B, T, H, K, V, C, G, keys = shape
    x = make_inputs(B, T, H, K, V, dtype=torch.bfloat16, device=DEVICE, keys=keys, initial_state=True)
    _check_against_one_level(x, G, C)


def test_packed_sequences():
    """Segments of 2 chunks of 16: sequences shorter than a segment, one exactly one, empty ones."""
    x, cu = _packed([5, 0, 70, 1, 32, 41], torch.bfloat16, keys="correlated", K=32, V=16, device=DEVICE)
    _check_against_one_level(x, 2, 16, cu)


def test_without_initial_state_and_a_segment_longer_than_the_sequence():
    x = make_inputs(1, 90, 1, 16, 16, dtype=torch.bfloat16, device=DEVICE)
    assert max(_errors(x, two_level(2), 16)) <= TOLERANCES[torch.bfloat16]
    assert max(_errors(x, two_level(8), 16)) <= TOLERANCES[torch.bfloat16]  # one segment


def test_gradients_through_it():
    """Training's forward may take it (backward is the one-level pass's): every gradient as accurate."""
    from test_api import check_against_oracle

    x = make_inputs(1, 80, 1, 16, 16, dtype=torch.bfloat16, device=DEVICE, keys="correlated", initial_state=True)
    check_against_oracle(x, chunk_size=16, plan=two_level(2))


def test_float32_inputs():
    x = make_inputs(1, 100, 1, 16, 16, dtype=torch.float32, device=DEVICE, keys="correlated", initial_state=True)
    assert max(_errors(x, two_level(2), 16)) < 1e-5


# The nine training shapes (d_model 2048, 16K tokens a batch) keep the one-level pass on the H200
TRAINING = [(B, T, 2048 // D, D) for B, T in ((8, 2048), (4, 4096), (2, 8192)) for D in (64, 128, 256)]


@pytest.mark.parametrize("C", [64, 32])
def test_automatic_choice(C):
    for B, T, H, D in TRAINING:
        assert segments.choose_segment([T // C] * B, H, D, D, 132) == 0, (B, T, H, D)
    for B, T, H in ((1, 65536, 8), (1, 32768, 8), (1, 65536, 2)):
        assert segments.choose_segment([T // C] * B, H, 128, 128, 132) > 1, (B, T, H)
    assert segments.choose_segment([65536 // C], 8, 128, 128, 16) == 0  # a small GPU is filled already
    assert segments.choose_segment([1, 1], 2, 64, 64, 132) == 0  # nothing to gain


def test_setting():
    cpu = torch.device("cpu")
    assert segments.segment_length(1, [1024], 8, 128, 128, cpu) == 0
    assert segments.segment_length(16, [1024], 8, 128, 128, cpu) == 16
    assert segments.segment_length(0, [1024], 8, 128, 128, cpu) == 0  # no SMs to fill off CUDA
    assert segments.segment_length(2, [4096], 32, 64, 64, cpu) == 4  # 2048 segments x 32 heads: too many programs
    assert plan_from_spec("fused,state_segment=32") == two_level(32)
    assert two_level(32).describe() == "C64 fused, segments of 32" and ONE_LEVEL.describe().endswith("one-level state")
    with pytest.raises(ValueError, match="state_segment"):
        two_level(3)
    with pytest.raises(ValueError, match="fused=True"):
        Plan(state_segment=8)
    assert Plan.from_json(two_level(64).to_json()) == two_level(64)


def test_segment_tables():
    table, of_sequence = segments.Segments.of([5, 0, 70, 1], 16, 2, "cpu")
    # first token, first chunk, chunks, tokens; 70 tokens = 5 chunks = segments of 2, 2, 1 chunks
    assert table.tolist() == [[0, 0, 1, 5], [5, 1, 2, 32], [37, 3, 2, 32], [69, 5, 1, 6], [75, 6, 1, 1]]
    assert of_sequence.tolist() == [[0, 1], [1, 0], [1, 3], [4, 1]]


def test_layer_prefill_takes_it(monkeypatch):
    """DeltaNet's prefill (use_cache=True) and CausalLM.generate run the fused forward's choice: forced to
    the two-level pass here (the automatic choice takes it on a GPU at long prompts)."""
    from deltaflex.layers import DeltaNet
    from deltaflex.models import CausalLM, LMConfig

    calls = []
    original = segments.state_two_level
    monkeypatch.setattr(segments, "state_two_level", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    from deltaflex.fused import chunk

    monkeypatch.setattr(chunk, "state_two_level", segments.state_two_level)
    layer = DeltaNet(32, 2, plan=two_level(2)).to(DEVICE, torch.bfloat16)
    reference = DeltaNet(32, 2, plan=ONE_LEVEL).to(DEVICE, torch.bfloat16)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(1, 64, 32, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        (o, cache), (o_one, cache_one) = layer(x, use_cache=True), reference(x, use_cache=True)
    assert calls and relative_error(o, o_one) < 2e-2
    assert relative_error(cache.recurrent_state, cache_one.recurrent_state) < 1e-2
    calls.clear()
    config = LMConfig(vocab_size=32, hidden_size=32, mixers=("deltanet",), num_heads=2)
    model = CausalLM(config, plan=two_level(2)).to(DEVICE, torch.bfloat16)
    model.generate(torch.randint(0, 32, (1, 40), device=DEVICE), max_new_tokens=2)
    assert calls


@pytest.mark.gpu
def test_automatic_choice_on_this_gpu():
    """At a long prompt with few heads the default plan takes the two-level pass on a large GPU."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    chosen = segments.segment_length(0, [16384 // 64], 2, 128, 128, torch.device("cuda"))
    assert (chosen > 1) == (segments.choose_segment([256], 2, 128, 128, sms) > 1)
    x = make_inputs(1, 16384, 2, 128, 128, dtype=torch.bfloat16, device="cuda", keys="correlated", initial_state=True)
    ours, one = _errors(x, FUSED, 64), _errors(x, ONE_LEVEL, 64)
    assert max(ours) <= TOLERANCES[torch.bfloat16] and ours[0] <= 1.1 * one[0] and ours[1] <= 1.25 * one[1] + 1e-5
