import math

import pytest
import torch
import torch.nn.functional as F

from minigpt.model import GPT, GPT2_VOCAB_SIZE, IGNORE_INDEX, PADDED_VOCAB_SIZE, GPTConfig

from conftest import tiny_config


def test_forward_shapes_and_no_loss_without_targets():
    model = GPT(tiny_config())
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, PADDED_VOCAB_SIZE)
    assert loss is None


def test_lm_head_is_tied_to_token_embedding():
    model = GPT(tiny_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_gpt2_parameter_counts():
    # 124,439,808 is the published count of OpenAI's gpt2 (50,257 rows); padding adds 47 rows.
    with torch.device("meta"):
        real = GPT(GPTConfig.from_preset("gpt2", vocab_size=GPT2_VOCAB_SIZE))
        padded = GPT(GPTConfig.from_preset("gpt2"))
    assert real.num_params() == 124_439_808
    assert padded.num_params() == 124_439_808 + 47 * 768 == 124_475_904
    assert padded.num_params(non_embedding=True) == 124_475_904 - 1024 * 768


def test_presets_have_the_published_shapes():
    expected = {
        "gpt2-medium": (24, 16, 1024),
        "gpt2-large": (36, 20, 1280),
        "gpt2-xl": (48, 25, 1600),
    }
    for name, (n_layer, n_head, n_embd) in expected.items():
        cfg = GPTConfig.from_preset(name)
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (
            n_layer,
            n_head,
            n_embd,
            1024,
        )
    assert GPTConfig.from_preset("gpt2", block_size=2048).block_size == 2048
    with pytest.raises(ValueError, match="unknown model preset 'gpt3'"):
        GPTConfig.from_preset("gpt3")


def test_init_statistics():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256)
    model = GPT(cfg)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    block = model.transformer.h[0]
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.03)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.03)
    assert torch.count_nonzero(block.attn.c_attn.bias) == 0
    assert torch.all(block.ln_1.weight == 1) and torch.all(block.ln_1.bias == 0)


def test_loss_equals_hand_computed_cross_entropy_with_ignore_index():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 9))
    targets = torch.randint(0, GPT2_VOCAB_SIZE, (2, 9))
    targets[0, :4] = IGNORE_INDEX
    logits, _ = model(idx)
    no_logits, loss = model(idx, targets)
    assert no_logits is None  # training returns only the loss
    log_probs = logits.double().log_softmax(-1)
    picked = [
        -log_probs[b, t, targets[b, t]].item()
        for b in range(2)
        for t in range(9)
        if targets[b, t] != IGNORE_INDEX
    ]
    assert len(picked) == 14
    assert loss.item() == pytest.approx(sum(picked) / len(picked), abs=1e-5)


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % GPT2_VOCAB_SIZE
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_block_matches_a_hand_written_gpt2_block():
    """One block against GPT-2's equations written out without our modules."""
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=1)).eval()
    blk = model.transformer.h[0]
    x = torch.randn(2, 7, 32)

    def ln(t, mod):
        return F.layer_norm(t, (32,), mod.weight, mod.bias, 1e-5)

    h = ln(x, blk.ln_1)
    q, k, v = (h @ blk.attn.c_attn.weight.T + blk.attn.c_attn.bias).split(32, dim=-1)
    heads = [t.view(2, 7, 2, 16).transpose(1, 2) for t in (q, k, v)]
    att = heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(16)
    att = att.masked_fill(torch.triu(torch.ones(7, 7, dtype=torch.bool), 1), float("-inf"))
    y = (att.softmax(-1) @ heads[2]).transpose(1, 2).reshape(2, 7, 32)
    x1 = x + y @ blk.attn.c_proj.weight.T + blk.attn.c_proj.bias
    h2 = ln(x1, blk.ln_2) @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias
    gelu = 0.5 * h2 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h2 + 0.044715 * h2**3)))
    expected = x1 + gelu @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias
    with torch.no_grad():
        torch.testing.assert_close(blk(x), expected, atol=1e-5, rtol=1e-5)


def test_sequence_longer_than_context_is_a_clear_error():
    model = GPT(tiny_config(block_size=16))
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = GPT(tiny_config(dropout=0.5))
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (1, 8))
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0])


def test_no_bias_option_and_flops():
    model = GPT(tiny_config(bias=False))
    assert all(not n.endswith(".bias") for n, _ in model.named_parameters())
    cfg = model.config
    n = model.num_params(non_embedding=True)
    assert model.flops_per_token(64) == 6 * n + 12 * cfg.n_layer * cfg.n_embd * 64
