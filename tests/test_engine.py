"""The engine against independent references: full re-forwarding, prompts run alone."""

from __future__ import annotations

import pytest
import torch

from minigpt.engine import CachedDecoder, Engine, EngineError, ReforwardDecoder, Sampling
from minigpt.model import GPT
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
N_VOCAB = 50260
GREEDY = Sampling(temperature=0)
PROMPTS = [[464, 2068, 7586, 21831], [40], [1212, 318, 257, 1332, 286, 262, 3303, 13, 383]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(tiny_config(block_size=128)).eval()


@torch.no_grad()
def test_cached_step_logits_equal_full_reforward_over_70_steps(model):
    cached = CachedDecoder(model, PROMPTS, max_len=9 + 70)
    reference = ReforwardDecoder(model, PROMPTS, max_len=9 + 70)
    logits, expected = cached.prefill(), reference.prefill()
    for _ in range(70):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        tokens = expected.argmax(dim=-1)
        logits, expected = cached.step(tokens), reference.step(tokens)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_greedy_tokens_with_cache_equal_without(model):
    with_cache = Engine(model, N_VOCAB).generate(PROMPTS, 70, GREEDY)
    without = Engine(model, N_VOCAB, use_kv_cache=False).generate(PROMPTS, 70, GREEDY)
    assert with_cache == without
    assert [len(out) for out in with_cache] == [70, 70, 70]


def test_left_padded_batch_gives_each_prompt_its_tokens_alone(model):
    engine = Engine(model, N_VOCAB)
    batch = engine.generate(PROMPTS, 40, GREEDY)
    assert batch == [engine.generate([p], 40, GREEDY)[0] for p in PROMPTS]


def test_same_seed_same_samples_with_and_without_cache(model):
    sampling = Sampling(temperature=1.0, top_k=100, top_p=0.95)
    engine = Engine(model, N_VOCAB)
    first = engine.generate(PROMPTS, 20, sampling, num_samples=2, seed=7)
    assert first == engine.generate(PROMPTS, 20, sampling, num_samples=2, seed=7)
    assert first != engine.generate(PROMPTS, 20, sampling, num_samples=2, seed=8)
    no_cache = Engine(model, N_VOCAB, use_kv_cache=False)
    assert first == no_cache.generate(PROMPTS, 20, sampling, num_samples=2, seed=7)


def test_samples_share_the_prefill_and_respect_top_k(model):
    engine = Engine(model, N_VOCAB)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    try:
        outs = engine.generate([PROMPTS[0]], 1, Sampling(top_k=3), num_samples=64, seed=0)
    finally:
        hook.remove()
    assert calls == [(1, 4)]  # one prefill of one row, fanned out to 64 samples
    with torch.no_grad():
        top3 = model(torch.tensor([PROMPTS[0]]))[0][0, -1].topk(3).indices.tolist()
    firsts = {out[0] for out in outs}
    assert firsts <= set(top3) and len(firsts) > 1
    assert engine.generate([PROMPTS[0]], 5, Sampling(top_k=1), seed=0) == engine.generate(
        [PROMPTS[0]], 5, GREEDY
    )
    assert engine.generate([PROMPTS[0]], 5, Sampling(top_p=1e-6), seed=0) == engine.generate(
        [PROMPTS[0]], 5, GREEDY
    )


def test_stop_ids_end_each_sequence_independently_and_free_its_row(model):
    engine = Engine(model, N_VOCAB)
    free = engine.generate(PROMPTS, 30, GREEDY)
    stops = [{free[0][2]}, {free[1][9]}, set()]
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].size(0)))
    try:
        outs = engine.generate(PROMPTS, 30, GREEDY, stop_ids=stops)
    finally:
        hook.remove()
    for out, full, stop in zip(outs, free, stops, strict=True):
        end = next((i + 1 for i, t in enumerate(full) if t in stop), len(full))
        assert out == full[:end]  # up to and including the first stop token
    assert len(outs[2]) == 30
    assert batch_sizes[0] == 3 and batch_sizes[-1] == 1  # finished rows leave the batch
    assert sorted(batch_sizes, reverse=True) == batch_sizes


def test_streaming_yields_the_generated_tokens_step_by_step(model):
    engine = Engine(model, N_VOCAB)
    stops = [set(), {engine.generate(PROMPTS, 6, GREEDY)[1][1]}, set()]
    steps = list(engine.stream(PROMPTS, 6, GREEDY, stop_ids=stops))
    assert len(steps) == 6 and [seq for seq, _ in steps[0]] == [0, 1, 2]
    assert [seq for seq, _ in steps[-1]] == [0, 2]
    rebuilt = [[t for step in steps for seq, t in step if seq == i] for i in range(3)]
    assert rebuilt == engine.generate(PROMPTS, 6, GREEDY, stop_ids=stops)


def test_output_is_bounded_by_the_context(model):
    engine = Engine(model, N_VOCAB)
    long_prompt = [13] * 126  # block_size 128: two more positions, then one last token
    short, long = engine.generate([[13], long_prompt], 10, GREEDY)
    assert (len(short), len(long)) == (10, 3)
    assert (
        engine.generate([[13] * 128], 10, GREEDY)[0]
        == Engine(model, N_VOCAB, use_kv_cache=False).generate([[13] * 128], 10, GREEDY)[0]
    )
    with pytest.raises(EngineError, match="more than the model's context of 128"):
        engine.generate([[13] * 129], 10, GREEDY)


def test_padded_vocab_rows_are_never_sampled():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    with torch.no_grad():  # every hidden state becomes b, and rows >= 50257 score highest on it
        model.transformer.ln_f.weight.zero_()
        b = torch.randn(model.config.n_embd)
        model.transformer.ln_f.bias.copy_(b)
        model.transformer.wte.weight[50257:] = 10 * b
    assert Engine(model, 50304).generate([[1]], 3, GREEDY)[0][0] >= 50257
    for n_vocab in (50260, 50257):
        out = Engine(model, n_vocab).generate([[1], [2, 3]], 8, Sampling(), seed=0)
        assert all(t < n_vocab for seq in out for t in seq)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[[]]), "prompt 0 is empty"),
        (dict(prompts=[[1], [50300]]), "prompt 1 has token ids outside"),
        (dict(prompts=[]), "no prompts"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(num_samples=0), "num_samples must be >= 1"),
        (dict(stop_ids=[{1}, {2}]), "2 stop-id sets for 1 prompts"),
    ],
)
def test_bad_requests_raise_engine_errors(model, kwargs, match):
    request = {"prompts": [[1]], "max_new_tokens": 5, **kwargs}
    with pytest.raises(EngineError, match=match):
        Engine(model, N_VOCAB).generate(**request)


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1), dict(top_k=0), dict(top_p=0), dict(top_p=1.5)]
)
def test_bad_sampling_settings_raise(kwargs):
    with pytest.raises(EngineError):
        Sampling(**kwargs)
