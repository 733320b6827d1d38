"""The model's inference paths: KV cache, positions and padding masks, new-row initialisation."""

from __future__ import annotations

import pytest
import torch

from minigpt.engine import KVCache
from minigpt.model import GPT, GPT2_VOCAB_SIZE
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(tiny_config(block_size=96)).eval()


@torch.no_grad()
def test_cached_decoding_matches_full_forward_logits(model):
    ids = torch.randint(0, GPT2_VOCAB_SIZE, (2, 80))
    reference, _ = model(ids)
    cache = KVCache(model.config, batch_size=2, max_len=80)
    logits, _ = model(ids[:, :10], kv_cache=cache)
    steps = [logits]
    for t in range(10, 80):  # 70 single-token steps
        step_logits, _ = model(ids[:, t : t + 1], kv_cache=cache)
        steps.append(step_logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), reference, atol=1e-4, rtol=0)
    assert cache.length == 80


@torch.no_grad()
def test_left_padding_with_positions_and_key_mask_matches_unpadded(model):
    prompt = torch.randint(0, GPT2_VOCAB_SIZE, (1, 12))
    alone, _ = model(prompt)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), prompt], dim=1)
    key_mask = torch.arange(17)[None] >= 5
    pos = (torch.arange(17) - 5).clamp(min=0)[None]
    logits, _ = model(padded, pos=pos, key_mask=key_mask)
    assert torch.isfinite(logits).all()  # padding queries attend to themselves, not to nothing
    torch.testing.assert_close(logits[:, 5:], alone, atol=1e-5, rtol=0)
    last, _ = model(padded, pos=pos, key_mask=key_mask, last_only=True)
    torch.testing.assert_close(last, alone[:, -1:], atol=1e-5, rtol=0)


def test_training_forward_is_unchanged_by_the_inference_arguments(model):
    ids = torch.randint(0, GPT2_VOCAB_SIZE, (2, 16))
    with torch.no_grad():
        logits, _ = model(ids)
        _, loss = model(ids, ids)
        explicit, _ = model(ids, pos=torch.arange(16), key_mask=torch.ones(2, 16, dtype=torch.bool))
    torch.testing.assert_close(explicit, logits, atol=1e-5, rtol=0)
    assert loss.item() > 0
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 97, dtype=torch.long))


@torch.no_grad()
def test_an_attention_mask_and_positions_pack_two_sequences_into_one_row(model):
    """What the scoring core relies on: a block-diagonal mask (bool or float) and per-sequence
    positions make one row compute each sequence as if alone."""
    a, b = torch.randint(0, GPT2_VOCAB_SIZE, (1, 5)), torch.randint(0, GPT2_VOCAB_SIZE, (1, 7))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    segment = torch.tensor([0] * 5 + [1] * 7)
    allowed = (segment[:, None] == segment[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    allowed = allowed[None, None]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    for mask in (allowed, additive):
        hidden = model.hidden_states(packed, pos=pos, attn_mask=mask)
        torch.testing.assert_close(hidden[:, :5], model.hidden_states(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(hidden[:, 5:], model.hidden_states(b), atol=1e-5, rtol=0)
    logits, _ = model(packed, pos=pos, attn_mask=allowed)
    torch.testing.assert_close(logits, model.lm_head(hidden), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="alternatives"):
        model(packed, attn_mask=allowed, key_mask=torch.ones(1, 12, dtype=torch.bool))


def test_new_token_rows_start_at_the_mean_embedding():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    wte = model.transformer.wte.weight
    before = wte.detach().clone()
    model.init_rows_to_mean(range(GPT2_VOCAB_SIZE, GPT2_VOCAB_SIZE + 3))
    mean = before[:GPT2_VOCAB_SIZE].mean(dim=0)
    for row in range(GPT2_VOCAB_SIZE, GPT2_VOCAB_SIZE + 3):
        torch.testing.assert_close(wte[row], mean)
        torch.testing.assert_close(model.lm_head.weight[row], mean)  # tied head follows
    torch.testing.assert_close(wte[:GPT2_VOCAB_SIZE], before[:GPT2_VOCAB_SIZE], atol=0, rtol=0)
    torch.testing.assert_close(wte[GPT2_VOCAB_SIZE + 3 :], before[GPT2_VOCAB_SIZE + 3 :])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.init_rows_to_mean(range(0, 3))
