"""LR schedule values, AdamW decay groups, Muon against torch's and against its definition, and
the gradient-accumulation arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from minigpt.config import TrainSection
from minigpt.errors import MinigptError
from minigpt.model import GPT
from minigpt.train.optim import (
    CPUMuon,
    MuonWithAdamW,
    build_optimizer,
    cosine_lr,
    grad_accum_steps,
    load_optimizer_state,
    muon_matrices,
    param_groups,
)

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
    opt = build_optimizer(model, TrainSection(max_lr=1e-3, weight_decay=0.1), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_cpu_uses_the_fused_kernel_and_it_steps_like_the_plain_one():
    """Fused AdamW on CPUs (one pass per tensor) takes the same steps as torch's per-tensor loop."""
    # in float64, where the two kernels' different rounding is far below any missed term (steps of
    # ~1e-2, a decay of 1e-2 x 0.5 x |w| per step); fp32 differs by up to 0.4% of a step
    fused, plain = GPT(tiny_config()).double(), GPT(tiny_config()).double()
    plain.load_state_dict(fused.state_dict())
    opt = build_optimizer(fused, TrainSection(max_lr=1e-2, weight_decay=0.5), "cpu")
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


# ----------------------------------------------------------------------------- Muon
def test_muon_takes_the_blocks_matrices_and_adamw_everything_else_once():
    model = GPT(tiny_config())
    opt = build_optimizer(model, TrainSection(optimizer="muon", max_lr=2e-3, muon_lr=0.02), "cpu")
    assert isinstance(opt, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in opt.muon.param_groups for p in g["params"]]
    adamw = [names[id(p)] for g in opt.adamw.param_groups for p in g["params"]]
    per_block = ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
    assert sorted(muon) == sorted(f"transformer.h.{i}.{n}" for i in range(2) for n in per_block)
    assert "transformer.wte.weight" in adamw and "transformer.wpe.weight" in adamw  # wte = head
    assert "transformer.h.0.attn.c_attn.bias" in adamw and "transformer.ln_f.weight" in adamw
    assert len(muon) + len(adamw) == len(set(muon + adamw)) == len(names)
    assert [g["lr_scale"] for g in opt.param_groups] == [pytest.approx(10.0), 1.0, 1.0]
    assert opt.muon.param_groups[0]["weight_decay"] == 0.0
    assert [g["weight_decay"] for g in opt.adamw.param_groups] == [0.1, 0.0]


def _muon_step(optimizer_class, weight, grads, **kwargs):
    param = torch.nn.Parameter(weight.clone())
    optimizer = optimizer_class([param], lr=0.02, weight_decay=0.0, **kwargs)
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    return param.detach()


def test_cpu_muon_steps_as_torch_muon_does():
    """The float32 Newton-Schulz of CPUMuon against torch's bf16 one: the same momentum, the
    same shape-scaled learning rate, updates equal to bf16's rounding."""
    torch.manual_seed(0)
    for shape in ((96, 32), (32, 96)):  # tall (scaled by sqrt(3)) and wide
        weight = torch.randn(shape)
        grads = [torch.randn(shape) for _ in range(3)]
        ours = _muon_step(CPUMuon, weight, grads) - weight
        torchs = _muon_step(torch.optim.Muon, weight, grads) - weight
        assert ours.norm() / torchs.norm() == pytest.approx(1.0, abs=0.02)
        cosine = (ours * torchs).sum() / (ours.norm() * torchs.norm())
        assert cosine > 0.999


def test_a_muon_step_is_the_orthogonalised_momentum():
    """Without momentum, one step moves the weight by lr x sqrt(max(1, rows / cols)) x about
    U V^T of the gradient: every singular value near 1 (the quintic's band, 0.6 to 1.2) however
    spread the gradient's are, and the same singular vectors."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(96, 32))
    v, _ = torch.linalg.qr(torch.randn(32, 32))
    spread = torch.logspace(0, -2, 32)  # singular values from 1 to 0.01
    grad = u @ torch.diag(spread) @ v.T
    weight = torch.zeros(96, 32)
    step = (weight - _muon_step(CPUMuon, weight, [grad], momentum=0.0, nesterov=False)) / (
        0.02 * math.sqrt(3)
    )
    values = torch.linalg.svdvals(step)
    assert values.min() > 0.6 and values.max() < 1.2
    projected = u.T @ step @ v  # diagonal when the singular vectors are the gradient's
    assert (projected - torch.diag(projected.diagonal())).abs().max() < 1e-3


def test_muon_state_survives_a_checkpoint_and_adamw_state_is_refused():
    model = GPT(tiny_config())
    train = TrainSection(optimizer="muon", max_lr=2e-3, muon_lr=0.02)
    opt = build_optimizer(model, train, "cpu")
    model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))[1].backward()
    opt.step()
    state = opt.state_dict()
    fresh = build_optimizer(model, train, "cpu")
    load_optimizer_state(fresh, state, train)
    for p in muon_matrices(model):
        assert torch.equal(
            fresh.muon.state[p]["momentum_buffer"], opt.muon.state[p]["momentum_buffer"]
        )
    adamw = build_optimizer(model, TrainSection(max_lr=2e-3), "cpu")
    with pytest.raises(
        MinigptError, match="trained with train.optimizer=muon.*--train.optimizer=muon"
    ):
        load_optimizer_state(adamw, state, TrainSection(max_lr=2e-3))
    with pytest.raises(MinigptError, match="trained with train.optimizer=adamw"):
        load_optimizer_state(fresh, adamw.state_dict(), train)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"optimizer": "sgd"}, "train.optimizer='sgd' is not one of adamw, muon"),
        ({"optimizer": "muon", "muon_lr": 0.0}, "train.muon_lr=0.0 must be > 0"),
        (
            {"optimizer": "muon", "muon_momentum": 1.0},
            r"train.muon_momentum=1.0 must be in \[0, 1\)",
        ),
        ({"optimizer": "muon", "muon_weight_decay": -0.1}, "train.muon_weight_decay=-0.1"),
    ],
)
def test_optimizer_settings_that_cannot_train_are_refused(setting, message):
    with pytest.raises(MinigptError, match=message):
        build_optimizer(GPT(tiny_config()), TrainSection(**setting), "cpu")
