"""The engine against independent references: full re-forwarding, prompts run alone."""

from __future__ import annotations

import pytest
import torch

from minigpt.device import autocast
from minigpt.engine import (
    CachedDecoder,
    Engine,
    EngineError,
    KVCache,
    ReforwardDecoder,
    Sampling,
    sample_next,
)
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


def prefill(decoder, start: int, prompts: list[list[int]]) -> torch.Tensor:
    """Prefill prompts into rows start.. in one forward: their next-token logits (n, V)."""
    hidden = decoder.prefill(start, prompts)
    return decoder.head(torch.stack([hidden[i, len(p) - 1] for i, p in enumerate(prompts)]))


@torch.no_grad()
def test_cached_step_logits_equal_full_reforward_over_70_steps_with_a_row_joining(model):
    cached = CachedDecoder(model, max_rows=4, max_len=12 + 70)
    reference = ReforwardDecoder(model, max_rows=4, max_len=12 + 70)
    logits = prefill(cached, 0, PROMPTS)  # three lengths in one padded forward
    expected = prefill(reference, 0, PROMPTS)
    for step in range(70):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        tokens = expected.argmax(dim=-1)
        logits = cached.head(cached.step(tokens))
        expected = reference.head(reference.step(tokens))
        if step == 20:  # a fourth sequence joins rows of three different lengths
            joining = [50, 51, 52, 53, 54]
            logits = torch.cat([logits, prefill(cached, 3, [joining])])
            expected = torch.cat([expected, prefill(reference, 3, [joining])])
        if step == 40:  # the first leaves; the last row takes its place
            cached.copy(3, 0), reference.copy(3, 0)
            cached.clear(3), reference.clear(3)
            logits, expected = logits[[3, 1, 2]], expected[[3, 1, 2]]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@torch.no_grad()
def test_fp32_model_under_autocast_caches_keys_in_the_attention_dtype(
    model, dtype, compiled, monkeypatch
):
    """Inference inside training (samples under the training autocast): a float32 model makes
    keys in the autocast dtype, and the cache keeps them in it, also on the per-row path that
    rows of different lengths take; logits follow the no-cache reference."""
    if compiled:  # what the decoder runs, prefill and step
        compiled_forward = torch.compile(model.hidden_states, backend="aot_eager")
        monkeypatch.setattr(model, "hidden_states", compiled_forward)
    with autocast(torch.device("cpu"), dtype):
        cached = CachedDecoder(model, max_rows=3, max_len=12 + 6)
        reference = ReforwardDecoder(model, max_rows=3, max_len=12 + 6)
        logits, expected = prefill(cached, 0, PROMPTS), prefill(reference, 0, PROMPTS)
        for _ in range(6):
            tokens = expected.argmax(dim=-1)
            logits = cached.head(cached.step(tokens))
            expected = reference.head(reference.step(tokens))
    assert cached.cache.k.dtype == cached.cache.v.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(logits.float(), expected.float(), atol=tolerance, rtol=0)


def test_a_cache_refuses_keys_of_another_dtype_mid_sequence(model):
    decoder = CachedDecoder(model, max_rows=1, max_len=8)
    with torch.no_grad():
        prefill(decoder, 0, [[1, 2, 3]])
        with (
            autocast(torch.device("cpu"), torch.bfloat16),
            pytest.raises(ValueError, match="same autocast"),
        ):
            decoder.step(torch.tensor([4]))


def test_greedy_tokens_with_cache_equal_without(model):
    with_cache = Engine(model, N_VOCAB).generate(PROMPTS, 70, GREEDY)
    without = Engine(model, N_VOCAB, use_kv_cache=False).generate(PROMPTS, 70, GREEDY)
    assert with_cache == without
    assert [len(out) for out in with_cache] == [70, 70, 70]


def test_left_padded_batch_gives_each_prompt_its_tokens_alone(model):
    engine = Engine(model, N_VOCAB)
    batch = engine.generate(PROMPTS, 40, GREEDY)
    assert batch == [engine.generate([p], 40, GREEDY)[0] for p in PROMPTS]


@pytest.mark.parametrize(("dtype", "rounding"), [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
@torch.no_grad()
def test_batching_changes_logits_by_rounding_only(model, dtype, rounding):
    """What the README claims of batch invariance: a row's logits in a batch of rows of other
    lengths (masked attention, matmuls of another shape) equal its logits alone within rounding,
    so a greedy token can differ only where its two best candidates are within that rounding."""
    with autocast(torch.device("cpu"), dtype):
        batched = CachedDecoder(model, max_rows=3, max_len=12 + 30)
        alone = [CachedDecoder(model, max_rows=1, max_len=12 + 30) for _ in PROMPTS]
        together = prefill(batched, 0, PROMPTS)
        apart = torch.cat([prefill(d, 0, [p]) for d, p in zip(alone, PROMPTS, strict=True)])
        for _ in range(30):
            torch.testing.assert_close(together.float(), apart.float(), atol=rounding, rtol=0)
            top2 = apart.float().topk(2, dim=-1).values
            near_tie = top2[:, 0] - top2[:, 1] <= 2 * rounding
            assert ((together.argmax(-1) == apart.argmax(-1)) | near_tie).all()
            tokens = together.argmax(dim=-1)
            together = batched.head(batched.step(tokens))
            apart = torch.cat([d.head(d.step(tokens[i : i + 1])) for i, d in enumerate(alone)])


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
    embed = model.transformer.wte
    hook = embed.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
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
    for tiny_p in (1e-6, 5e-324):  # 5e-324 is 0 in float32: the top token must still stay
        assert engine.generate([PROMPTS[0]], 5, Sampling(top_p=tiny_p), seed=0) == (
            engine.generate([PROMPTS[0]], 5, GREEDY)
        )


def test_stop_ids_end_each_sequence_independently_and_free_its_row(model):
    engine = Engine(model, N_VOCAB)
    free = engine.generate(PROMPTS, 30, GREEDY)
    stops = [{free[0][2]}, {free[1][9]}, set()]
    shapes = []
    embed = model.transformer.wte  # every forward, prefill or step, embeds its tokens first
    hook = embed.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape))
    try:
        outs = engine.generate(PROMPTS, 30, GREEDY, stop_ids=stops)
    finally:
        hook.remove()
    for out, full, stop in zip(outs, free, stops, strict=True):
        end = next((i + 1 for i, t in enumerate(full) if t in stop), len(full))
        assert out == full[:end]  # up to and including the first stop token
    assert len(outs[2]) == 30
    assert tuple(shapes[0]) == (3, 9)  # the prompts are prefilled together, padded to the longest
    batch_sizes = [s[0] for s in shapes[1:]]  # then decode steps, all rows together
    assert len(batch_sizes) == 29 and batch_sizes[-1] == 1  # finished rows leave the batch
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
        (dict(prompts=[[]]), "prompt 1 is empty"),
        (dict(prompts=[[1], [50300]]), "prompt 2 has token ids outside"),
        (dict(prompts=[]), "no prompts"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(num_samples=0), "num_samples must be >= 1"),
        (dict(prompts=[[1] * 129]), "prompt 1 has 129 tokens, more than the model's context"),
        (dict(stop_ids=[{1}, {2}]), "2 stop-id sets for 1 prompts"),
    ],
)
def test_bad_requests_raise_engine_errors(model, kwargs, match):
    request = {"prompts": [[1]], "max_new_tokens": 5, **kwargs}
    with pytest.raises(EngineError, match=match):
        Engine(model, N_VOCAB).generate(**request)


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5)]
)
def test_bad_sampling_settings_raise(kwargs):
    with pytest.raises(EngineError):
        Sampling(**kwargs)


def _greedy_alone(engine, prompts, max_new):
    return [engine.generate([p], n, GREEDY)[0] for p, n in zip(prompts, max_new, strict=True)]


def test_sixteen_concurrent_greedy_requests_each_get_their_tokens_alone(model):
    engine = Engine(model, N_VOCAB)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50257, (1 + 3 * i,), generator=gen).tolist() for i in range(16)]
    max_new = [5 + 2 * i for i in range(16)]
    batch = engine.batcher(16)
    seqs = [batch.submit(p, n, GREEDY)[0] for p, n in zip(prompts, max_new, strict=True)]
    running = []
    while not batch.idle:
        batch.step()
        running.append(batch.running)
    assert max(running) == 16 and running[-1] == 0  # all shared the batch, then left
    assert [s.tokens for s in seqs] == _greedy_alone(engine, prompts, max_new)
    assert all(s.finish_reason == "length" for s in seqs)


def test_a_request_joining_mid_flight_changes_nothing_and_queues_wait_for_rows(model):
    engine = Engine(model, N_VOCAB)
    batch = engine.batcher(3)
    first = [batch.submit(p, 30, GREEDY)[0] for p in PROMPTS]
    for _ in range(10):
        batch.step()
    late = batch.submit([7, 8, 9], 12, GREEDY)[0]
    batch.step()
    assert batch.queued == 1 and not late.tokens  # no free row yet: it waits
    batch.cancel(first[1])
    batch.step()
    assert first[1].finish_reason == "cancelled" and len(first[1].tokens) == 11
    assert batch.queued == 0 and len(late.tokens) == 1  # the freed row serves it at once
    while not batch.idle:
        batch.step()
    alone = _greedy_alone(engine, [*PROMPTS, [7, 8, 9]], [30, 30, 30, 12])
    assert first[0].tokens == alone[0] and first[2].tokens == alone[2]
    assert first[1].tokens == alone[1][:11] and late.tokens == alone[3]


def test_seeded_samples_do_not_depend_on_the_rest_of_the_batch(model):
    engine = Engine(model, N_VOCAB)
    sampling = Sampling(temperature=1.0, top_k=200)
    alone = engine.batcher(4)
    want = alone.submit(PROMPTS[0], 15, sampling, n=2, seed=3)
    while not alone.idle:
        alone.step()
    busy = engine.batcher(6)
    busy.submit(PROMPTS[1], 20, Sampling(temperature=0.8))
    got = busy.submit(PROMPTS[0], 15, sampling, n=2, seed=3)
    busy.submit(PROMPTS[2], 20, sampling, seed=4)
    while not busy.idle:
        busy.step()
    assert [s.tokens for s in got] == [s.tokens for s in want]
    assert got[0].tokens != got[1].tokens  # the n samples are different streams


@torch.no_grad()
def test_decode_on_rows_of_one_length_uses_no_mask_and_equals_the_masked_step(model, monkeypatch):
    """One new token per row on equal-length rows attends to every key: SDPA gets no mask (its
    flash path on GPUs), and the logits equal those of the explicitly masked computation."""
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.config, batch_size=3, max_len=16)
    cache.select_rows(0, 2)
    model(ids[:, :8], kv_cache=cache)
    masks.clear()
    unmasked, _ = model(ids[:, 8:], kv_cache=cache)
    assert masks == [None] * model.config.n_layer
    # the same step with a third, shorter row in the batch takes the masked path
    mixed = KVCache(model.config, batch_size=3, max_len=16)
    mixed.select_rows(0, 2)
    model(ids[:, :8], kv_cache=mixed)
    mixed.select_rows(2, 3)
    model(ids[:1, :3], kv_cache=mixed)
    mixed.select_rows(0, 3)
    masks.clear()
    masked, _ = model(torch.cat([ids[:, 8:], ids[:1, 3:4]]), kv_cache=mixed)
    assert all(m is not None and m.shape == (3, 1, 1, 9) for m in masks)
    torch.testing.assert_close(masked[:2], unmasked, atol=1e-5, rtol=0)
    full, _ = model(ids)
    torch.testing.assert_close(unmasked[:, -1], full[:, -1], atol=1e-4, rtol=0)


def test_tiny_temperatures_are_greedy_and_overflowing_logits_never_reach_sampling():
    logits = torch.tensor([[0.5, 3.0, -1.0], [1e38, -1e38, 2e38]])
    want = logits.argmax(dim=-1)
    for temperature in (1e-45, 1e-30, 1e-5):
        assert torch.equal(sample_next(logits, Sampling(temperature=temperature)), want)
    # dividing by 1e-3 overflows the second row to inf: that row takes its argmax
    tokens = sample_next(logits, Sampling(temperature=1e-3, top_p=0.9))
    assert tokens[1] == 2


def test_a_row_with_nan_logits_fails_alone_and_the_others_finish_as_alone(model):
    engine = Engine(model, N_VOCAB)
    batch = engine.batcher(5)
    healthy = [batch.submit(p, 20, GREEDY)[0] for p in PROMPTS]
    seeded = batch.submit(PROMPTS[0], 20, Sampling(temperature=1.0, top_k=50), seed=4)[0]
    poisoned = batch.submit([5, 6, 7], 20, Sampling(temperature=0.8))[0]
    head = batch.decoder.head

    def poison(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden).clone()
        for r, seq in enumerate(batch.rows):
            if seq is poisoned and len(seq.tokens) >= 3:
                logits[r, 100] = float("nan")
        return logits

    batch.decoder.head = poison
    failed = []
    while not batch.idle:
        batch.step()
        failed += batch.failed
    assert failed == [poisoned] and poisoned.finish_reason == "error"
    assert "not finite" in poisoned.error and len(poisoned.tokens) == 3
    assert [s.tokens for s in healthy] == _greedy_alone(engine, PROMPTS, [20, 20, 20])
    alone = engine.batcher(1)
    want = alone.submit(PROMPTS[0], 20, Sampling(temperature=1.0, top_k=50), seed=4)[0]
    while not alone.idle:
        alone.step()
    assert seeded.tokens == want.tokens
    # Engine.stream has one caller: a failed sequence is that caller's error
    hook = model.lm_head.register_forward_hook(lambda m, i, out: out * float("nan"))
    try:
        with pytest.raises(EngineError, match="sequence 0 could not be generated"):
            engine.generate([[1, 2]], 3, GREEDY)
    finally:
        hook.remove()


def test_chunked_batched_prefill_gives_each_request_its_tokens_alone(model):
    """Prompts prefilled together in chunks of at most 5 tokens, interleaved with decode steps,
    joining and leaving (one fanned out to 2 samples, one cancelled part-way through its
    prompt, one scored): every greedy request gets its tokens alone, the scored prompt its
    logprobs alone."""
    engine = Engine(model, N_VOCAB)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 50257, (n,), generator=gen).tolist() for n in (23, 1, 9, 14, 3)]
    batch = engine.batcher(7, max_prefill_tokens=5)
    seqs = [batch.submit(p, 12, GREEDY)[0] for p in prompts[:3]]
    pair = batch.submit(prompts[3], 10, GREEDY, n=2)
    scored = batch.submit(prompts[4], 6, GREEDY, prompt_logprobs=2)[0]
    gone = batch.submit(prompts[0], 5, GREEDY)[0]
    steps = 0
    while not batch.idle:
        batch.step()
        steps += 1
        if steps == 6:
            batch.cancel(gone)
        if steps == 4:  # a late request joins while others are still prefilling
            seqs.append(batch.submit(prompts[2][:4], 8, GREEDY)[0])
    alone = _greedy_alone(engine, [*prompts[:3], prompts[2][:4]], [12, 12, 12, 8])
    assert [s.tokens for s in seqs] == alone
    assert [s.tokens for s in pair] == _greedy_alone(engine, [prompts[3]] * 2, [10, 10])
    assert gone.finish_reason == "cancelled" and not gone.tokens
    single = engine.batcher(1)
    want = single.submit(prompts[4], 6, GREEDY, prompt_logprobs=2)[0]
    while not single.idle:
        single.step()
    assert scored.tokens == want.tokens and scored.prompt_logprobs[0] is None
    for got, expected in zip(scored.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True):
        assert got.token == expected.token and abs(got.logprob - expected.logprob) < 1e-4


def test_a_long_prompt_is_prefilled_over_steps_while_the_running_rows_decode(model):
    engine = Engine(model, N_VOCAB)
    batch = engine.batcher(4, max_prefill_tokens=8)
    running = batch.submit(PROMPTS[2], 40, GREEDY)[0]
    batch.step(), batch.step()  # its 9 prompt tokens take two steps
    assert len(running.tokens) == 1
    long_prompt = list(range(100, 160))
    late = batch.submit(long_prompt, 5, GREEDY)[0]
    tokens = []
    embed = model.transformer.wte
    hook = embed.register_forward_pre_hook(lambda m, args: tokens.append(args[0].numel()))
    try:
        for step in range(1, 9):
            batch.step()
            assert len(running.tokens) == 1 + step  # a token every step, never stalled
            assert bool(late.tokens) == (step == 8)  # 60 prompt tokens: 8 chunks of <= 8
    finally:
        hook.remove()
    assert max(tokens) <= 8  # no forward took more than the budget (decode steps: 1 token)
    while not batch.idle:
        batch.step()
    assert [running.tokens, late.tokens] == _greedy_alone(
        engine, [PROMPTS[2], long_prompt], [40, 5]
    )


def test_the_head_runs_once_a_step_over_running_and_joining_rows(model):
    """Requests joining mid-decode (one with 2 samples) get their logits from the same head
    call as the running rows, and every greedy request still gets its tokens alone."""
    engine = Engine(model, N_VOCAB)
    batch = engine.batcher(6, max_prefill_tokens=6)
    first = [batch.submit(p, 20, GREEDY)[0] for p in PROMPTS[:2]]
    rows_per_call = []
    hook = model.lm_head.register_forward_pre_hook(
        lambda m, args: rows_per_call.append(args[0].size(0))
    )
    try:
        steps = 0
        while not batch.idle:
            before = len(rows_per_call)
            events = batch.step()
            assert len(rows_per_call) - before == (1 if events else 0)
            if events:
                assert rows_per_call[-1] == len(events)
            steps += 1
            if steps == 4:
                late = batch.submit(PROMPTS[2], 15, GREEDY)[0]
                pair = batch.submit([7, 8, 9], 12, GREEDY, n=2)
    finally:
        hook.remove()
    assert max(rows_per_call) == 5  # the running rows and the joining ones, in one call
    alone = _greedy_alone(engine, [*PROMPTS, [7, 8, 9]], [20, 20, 15, 12])
    assert [s.tokens for s in first] == alone[:2] and late.tokens == alone[2]
    assert [s.tokens for s in pair] == [alone[3]] * 2
