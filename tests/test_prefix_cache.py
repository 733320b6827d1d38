"""Prefix caching: a prompt that continues an earlier sequence prefills only what is new, and
every greedy request still gets the tokens it gets without the cache, under batching, chunking
and eviction."""

from __future__ import annotations

import pytest
import torch

from minigpt.chat import ChatSession
from minigpt.engine import Engine, Sampling
from minigpt.model import GPT
from minigpt.prefix_cache import BLOCK
from minigpt.tokenizer import get_tokenizer
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
N_VOCAB = 50260
GREEDY = Sampling(temperature=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(tiny_config(block_size=256)).eval()


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 50257, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Prefilled:
    """The tokens each forward embeds (prefill chunks and decode steps), in order."""

    def __init__(self, model: GPT) -> None:
        self.forwards: list[int] = []
        self.hook = model.transformer.wte.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.forwards.append(args[0].numel())

    def __enter__(self) -> Prefilled:
        return self

    def __exit__(self, *exc) -> None:
        self.hook.remove()


def test_a_next_turn_prefills_only_its_new_tokens_and_gets_the_same_tokens(model):
    cached, plain = Engine(model, N_VOCAB, prefix_cache_mb=8), Engine(model, N_VOCAB)
    history = prompt_of(37, 1)
    for turn in range(4):
        out = cached.generate([history], 12, GREEDY)[0]
        assert out == plain.generate([history], 12, GREEDY)[0], turn
        held = len(history) + len(out) - 1  # the row holds all but the last token
        history = history + out + prompt_of(9, 10 + turn)
        with Prefilled(model) as counted:
            again = cached.generate([history], 1, GREEDY)[0]
        reused = held // BLOCK * BLOCK
        assert counted.forwards == [len(history) - reused]  # one forward: the new tokens only
        assert again == plain.generate([history], 1, GREEDY)[0]
    cache = cached.prefix_cache
    assert cache.hit_tokens > 0 and cache.hit_tokens <= cache.query_tokens


def test_reuse_under_batching_and_chunking_gives_each_request_its_tokens_alone(model):
    engine = Engine(model, N_VOCAB, prefix_cache_mb=8)
    system = prompt_of(40, 2)  # a shared system prompt, then each user's own words
    engine.generate([system + prompt_of(3, 3)], 4, GREEDY)  # seeds the cache
    prompts = [system + prompt_of(2 + 3 * i, 20 + i) for i in range(6)]
    batch = engine.batcher(4, max_prefill_tokens=7)
    seqs = [batch.submit(p, 10, GREEDY)[0] for p in prompts]
    while not batch.idle:
        batch.step()
    plain = Engine(model, N_VOCAB)
    assert [s.tokens for s in seqs] == [plain.generate([p], 10, GREEDY)[0] for p in prompts]
    assert engine.prefix_cache.hit_tokens >= 6 * (40 // BLOCK * BLOCK)


def test_a_small_budget_evicts_least_recently_used_blocks_and_stays_exact(model):
    block_bytes = 2 * model.config.n_layer * model.config.n_embd * BLOCK * 4  # float32
    engine = Engine(model, N_VOCAB, prefix_cache_mb=3 * block_bytes / 2**20)
    plain = Engine(model, N_VOCAB)
    prompts = [prompt_of(50, 30 + i) for i in range(4)]
    for prompt in prompts * 2:
        assert engine.generate([prompt], 6, GREEDY) == plain.generate([prompt], 6, GREEDY)
    cache = engine.prefix_cache
    assert cache.bytes <= cache.max_bytes and len(cache.blocks) == 3 and cache.evicted > 0
    # the most recent sequence's first blocks are what is left: its prompt hits again
    hits = cache.hit_tokens
    engine.generate([prompts[-1]], 1, GREEDY)
    assert cache.hit_tokens - hits == 3 * BLOCK


def test_chat_stops_re_prefilling_its_history(model):
    tok = get_tokenizer()
    cached = ChatSession(Engine(model, N_VOCAB, prefix_cache_mb=8), tok, GREEDY, reply_tokens=8)
    plain = ChatSession(Engine(model, N_VOCAB), tok, GREEDY, reply_tokens=8)
    messages = [
        "Hello there, how are you today? I would like to hear about the weather where you are.",
        "Tell me about the sea: its colour, its tides, and the ships that sail on it at night.",
        "And the sky above it, at dawn and at dusk, with the birds flying home over the water?",
    ]
    previous = 0  # the last prompt's length: the next prompt starts with it
    for text in messages:
        with Prefilled(model) as counted:
            reply = "".join(cached.reply(text))
        assert reply == "".join(plain.reply(text))
        prompt = tok.render_for_completion(cached.history[:-1])
        # the last prompt's full blocks are reused at least (its reply's too, when it
        # re-encodes to the tokens generated)
        assert counted.forwards[0] <= len(prompt) - previous // BLOCK * BLOCK
        previous = len(prompt)


def test_the_server_reuses_a_conversations_turns_and_reports_it_in_metrics(model):
    import httpx

    from tests.test_serve import MODEL, LiveServer, chat_stops

    tok = get_tokenizer()
    torch.set_num_threads(1)
    live = LiveServer(Engine(model, N_VOCAB, prefix_cache_mb=8), max_batch=4)
    plain = Engine(model, N_VOCAB)
    messages = [{"role": "system", "content": "You answer in long, careful sentences. " * 3}]
    try:
        for turn in range(3):
            messages.append({"role": "user", "content": f"Question number {turn}, please?"})
            reply = live.client().chat.completions.create(
                model=MODEL, messages=messages, max_tokens=10, temperature=0
            )
            text = reply.choices[0].message.content
            ids = plain.generate([tok.render_for_completion(messages)], 10, GREEDY,
                                 stop_ids=chat_stops())[0]  # fmt: skip
            assert text == tok.decode([t for t in ids if t not in chat_stops()]), turn
            messages.append({"role": "assistant", "content": text})
        metrics = httpx.get(live.url + "/metrics").text
    finally:
        live.close()
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("minigpt_prefix_cache")
    }
    assert values["minigpt_prefix_cache_hit_tokens_total"] >= 2 * 32  # the system prompt twice
    assert 0 < values["minigpt_prefix_cache_hit_rate"] < 1
    assert values["minigpt_prefix_cache_tokens"] > 0
