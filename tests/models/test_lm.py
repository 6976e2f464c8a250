"""CausalLM: forward/backward for every layer kind and preset, cached generation = recomputing the full
forward at every step, checkpoints reload to identical logits, tied/untied heads, argument checks."""

import pytest
import torch

from deltaflex import DeltaNet, DeltaNetCache, Plan
from deltaflex.models import Attention, CausalLM, KVCache, LinearAttention, LinearAttentionCache, LMConfig, preset
from deltaflex.testing import relative_error

VOCAB, HIDDEN, HEADS = 40, 32, 2
EAGER_16 = Plan(chunk_size=16, compile=False)  # several chunks at the tiny test lengths
LAYOUTS = {
    "deltanet": ("deltanet", "deltanet"),
    "attention": ("attention", "attention"),
    "sliding_window": ("sliding_window", "sliding_window"),
    "linear": ("linear", "linear"),
    "all_kinds": ("deltanet", "sliding_window", "linear", "attention"),
}


def make_model(mixers, dtype=torch.float64, **fields):
    """A model whose weights are large enough that every layer moves the logits (the 0.02 init
    would leave a broken cache hidden in the last digits)."""
    config = LMConfig(vocab_size=VOCAB, hidden_size=HIDDEN, mixers=mixers, num_heads=HEADS, window_size=5, **fields)
    model = CausalLM(config, plan=EAGER_16).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.2) + (p.dim() == 1))
    return model


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_backward_reaches_every_parameter(layout):
    model = make_model(LAYOUTS[layout], torch.float32)
    ids = torch.randint(0, VOCAB, (2, 23))
    logits, cache = model(ids)
    assert logits.shape == (2, 23, VOCAB) and logits.dtype == torch.float32 and cache is None
    logits.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_causal(layout):
    model = make_model(LAYOUTS[layout])
    ids = torch.randint(0, VOCAB, (1, 17))
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % VOCAB
    a, b = model(ids)[0], model(changed)[0]
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("layout", [*LAYOUTS, "hybrid-sliding-window", "hybrid-global-attention"])
def test_cached_generation_equals_full_recompute(layout):
    mixers = preset(layout, 4).mixers if layout.startswith("hybrid") else LAYOUTS[layout]
    model = make_model(mixers)
    prompt = torch.randint(0, VOCAB, (2, 7))
    tokens, step_logits = model.generate(prompt, 12, return_logits=True)
    assert tokens.shape == (2, 19) and torch.equal(tokens[:, :7], prompt)
    assert torch.equal(tokens[:, 7:], step_logits.argmax(-1))  # greedy
    for i in range(12):  # the full forward over everything so far, at every step
        full = model(tokens[:, : 7 + i])[0][:, -1]
        assert relative_error(step_logits[:, i], full) < 1e-11, i
    caches = model(prompt, use_cache=True)[1]
    kinds = {"deltanet": DeltaNetCache, "linear": LinearAttentionCache, "attention": KVCache, "sliding_window": KVCache}
    assert [type(c) for c in caches] == [kinds[m] for m in mixers]


def test_cached_generation_in_float32_and_a_broken_cache_is_caught():
    model = make_model(LAYOUTS["all_kinds"], torch.float32)
    prompt = torch.randint(0, VOCAB, (2, 9))
    tokens, step_logits = model.generate(prompt, 6, return_logits=True)
    full = model(tokens[:, :-1])[0][:, 8:]
    assert relative_error(step_logits, full) < 1e-5
    # the check above can fail: decoding from a cache of another prompt gives other logits
    _, wrong_cache = model(torch.randint(0, VOCAB, (2, 9)), use_cache=True)
    wrong = model(tokens[:, 9:10], cache=wrong_cache)[0][:, -1]
    assert relative_error(wrong, full[:, 1]) > 1e-2


def test_sampling_is_reproducible_with_a_generator():
    model = make_model(LAYOUTS["deltanet"])
    prompt = torch.randint(0, VOCAB, (3, 4))
    draw = lambda seed: model.generate(  # noqa: E731
        prompt, 8, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    tokens, logits = model.generate(prompt, 8, temperature=1.0, top_k=1, return_logits=True)
    assert torch.equal(tokens[:, 4:], logits.argmax(-1))  # top_k = 1 is greedy


@pytest.mark.parametrize("tie", [True, False])
def test_checkpoint_reloads_to_identical_logits(tmp_path, tie):
    model = make_model(LAYOUTS["all_kinds"], torch.float32, tie_embeddings=tie)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    model.config.to_json(tmp_path / "config.json")
    fresh = CausalLM(LMConfig.from_json(tmp_path / "config.json"), plan=EAGER_16)
    ids = torch.randint(0, VOCAB, (2, 21))
    assert not torch.equal(fresh(ids)[0], model(ids)[0])
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert torch.equal(fresh(ids)[0], model(ids)[0])
    assert (fresh.head.weight is fresh.embed.weight) == tie


def test_tied_and_untied_heads():
    tied = CausalLM(LMConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_heads=HEADS, mixers=("attention",)))
    untied = CausalLM(LMConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_heads=HEADS, mixers=("attention",), tie_embeddings=False))
    assert tied.head.weight is tied.embed.weight
    assert untied.num_parameters() - tied.num_parameters() == VOCAB * HIDDEN


def test_layers_are_built_from_the_config():
    config = LMConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_heads=HEADS, mixers=("deltanet", "sliding_window", "linear", "attention"),
        window_size=3, intermediate_size=48, attention_backend="flex", deltanet={"use_gate": True, "conv_size": 2},
    )
    model = CausalLM(config, plan="eager")
    mixers = [b.mixer for b in model.blocks]
    assert [type(m) for m in mixers] == [DeltaNet, Attention, LinearAttention, Attention]
    assert mixers[0].use_gate and mixers[0].conv_size == 2 and mixers[0].plan == "eager"
    assert (mixers[1].window_size, mixers[3].window_size, mixers[3].backend) == (3, None, "flex")
    assert model.blocks[0].mlp.up_proj.out_features == 48


def test_bad_arguments():
    model = make_model(LAYOUTS["deltanet"])
    ids = torch.randint(0, VOCAB, (2, 5))
    _, cache = model(ids, use_cache=True)
    cases = [
        (lambda: CausalLM({"vocab_size": 3}), TypeError, "config must be an LMConfig"),
        (lambda: model(ids[0]), ValueError, r"input_ids must be \[B, T\]"),
        (lambda: model(ids[:, :0]), ValueError, r"input_ids must be \[B, T\] with T >= 1"),
        (lambda: model(ids.float()), TypeError, "input_ids must be int64 or int32"),
        (lambda: model(ids, cache=cache[:1]), ValueError, "cache must be the tuple of 2 layer caches"),
        (lambda: model.generate(ids, 0), ValueError, "max_new_tokens must be a positive integer"),
        (lambda: model.generate(ids, 2, temperature=-1.0), ValueError, "temperature must be >= 0"),
        (lambda: model.generate(ids, 2, temperature=1.0, top_k=0), ValueError, "top_k must be None or an integer"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
