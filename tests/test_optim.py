"""LR schedule values, AdamW decay groups and the gradient-accumulation arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from minigpt.errors import MinigptError
from minigpt.model import GPT
from minigpt.train.optim import build_optimizer, cosine_lr, grad_accum_steps, param_groups

from conftest import tiny_config

MAX, MIN, WARMUP, STEPS = 6e-4, 6e-5, 10, 110


def lr(step):
    return cosine_lr(step, MAX, MIN, WARMUP, STEPS)


def test_warmup_is_linear_and_ends_at_max_lr():
    assert lr(0) == pytest.approx(MAX / 10)
    assert lr(4) == pytest.approx(MAX * 5 / 10)
    assert lr(WARMUP - 1) == pytest.approx(MAX)
    assert lr(WARMUP) == pytest.approx(MAX)  # cosine starts at its top


def test_cosine_decay_mid_quarter_and_end():
    assert lr(60) == pytest.approx((MAX + MIN) / 2)  # halfway through the decay
    quarter = MIN + (MAX - MIN) * (1 + math.cos(math.pi / 4)) / 2  # 25% through: cos(pi/4)
    assert lr(35) == pytest.approx(quarter)
    assert lr(STEPS) == pytest.approx(MIN)
    assert lr(STEPS + 50) == pytest.approx(MIN)


def test_schedule_is_monotone_after_warmup():
    values = [lr(s) for s in range(WARMUP, STEPS + 1)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_decay_groups_split_matrices_from_vectors():
    model = GPT(tiny_config())
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "transformer.wte.weight" in decay_names  # tied with lm_head: present once
    assert "transformer.h.0.attn.c_attn.weight" in decay_names
    assert "transformer.h.1.mlp.c_proj.weight" in decay_names
    assert all(n.endswith(".bias") or ".ln_" in n for n in no_decay_names)
    assert "transformer.h.0.ln_1.weight" in no_decay_names
    assert "transformer.h.0.attn.c_attn.bias" in no_decay_names
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == model.num_params()


def test_optimizer_uses_the_groups_and_betas():
    model = GPT(tiny_config())
    opt = build_optimizer(model, 1e-3, 0.1, [0.9, 0.95], 1e-8, "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_cpu_uses_the_fused_kernel_and_it_steps_like_the_plain_one():
    """Fused AdamW on CPUs (one pass per tensor) takes the same steps as torch's per-tensor loop."""
    # in float64, where the two kernels' different rounding is far below any missed term (steps of
    # ~1e-2, a decay of 1e-2 x 0.5 x |w| per step); fp32 differs by up to 0.4% of a step
    fused, plain = GPT(tiny_config()).double(), GPT(tiny_config()).double()
    plain.load_state_dict(fused.state_dict())
    opt = build_optimizer(fused, 1e-2, 0.5, [0.9, 0.95], 1e-8, "cpu")
    assert opt.defaults["fused"] is True
    groups = param_groups(plain, 0.5)
    reference = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    tokens = torch.randint(0, 64, (2, 9))
    for _ in range(3):
        for model, optimizer in ((fused, opt), (plain, reference)):
            model(tokens[:, :-1], tokens[:, 1:])[1].backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(fused.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_grad_accum_steps():
    assert grad_accum_steps(524288, 64, 1024, 1) == 8
    assert grad_accum_steps(524288, 64, 1024, 8) == 1
    assert grad_accum_steps(2048, 16, 128, 1) == 1
    with pytest.raises(MinigptError, match=r"multiple of .* = 196,608"):
        grad_accum_steps(524288, 64, 1024, 3)
