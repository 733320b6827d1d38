"""The chunked output layer + cross-entropy against the plain one-shot computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minigpt.head_loss import linear_cross_entropy
from minigpt.model import GPT, GPT2_VOCAB_SIZE, IGNORE_INDEX

from conftest import tiny_config


def plain(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX)


def inputs(n=70, c=16, v=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(v, c, generator=g)).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::7] = IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize("rows", [1, 16, 64, 1000])  # chunks of one row, uneven, one chunk
def test_loss_and_gradients_equal_the_plain_computation(rows):
    hidden, weight, targets = inputs()
    expected = plain(hidden, weight, targets)
    dh, dw = torch.autograd.grad(3 * expected, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, targets, IGNORE_INDEX, rows)
    gh, gw = torch.autograd.grad(3 * got, (hidden, weight))  # an upstream gradient, not 1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(gh, dh, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, dw, atol=1e-5, rtol=0)


class MatmulDtypes(TorchDispatchMode):
    """Records the operand dtypes of every matmul kernel run, as the kernel sees them: below
    autocast, so after its casts, and out= or in-place calls included."""

    OPERANDS = {"mm": (0, 1), "addmm": (1, 2), "addmm_": (1, 2)}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operands = self.OPERANDS.get(func.overloadpacket.__name__)
        if operands:
            self.seen.append((str(func), {args[i].dtype for i in operands}))
        return func(*args, **(kwargs or {}))


def test_under_bf16_autocast_every_head_matmul_runs_in_bf16():
    """The logits, hidden-gradient and weight-gradient matmuls all run in the autocast dtype
    (out= and in-place matmuls are not autocast: the weight gradient's ran in fp32)."""
    hidden, weight, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16), MatmulDtypes() as matmuls:
        linear_cross_entropy(hidden, weight, targets, IGNORE_INDEX, 16)
    assert len(matmuls.seen) == 3 * 5  # 70 rows in 5 chunks of 14
    assert all(dtypes == {torch.bfloat16} for _, dtypes in matmuls.seen), matmuls.seen
    with MatmulDtypes() as matmuls:  # without autocast: fp32, logits into the reused buffer
        linear_cross_entropy(hidden, weight, targets, IGNORE_INDEX, 16)
    assert all(dtypes == {torch.float32} for _, dtypes in matmuls.seen), matmuls.seen
    assert sum(op == "aten.mm.out" for op, _ in matmuls.seen) == 5 + 1


def test_under_bf16_autocast_gradients_match_the_plain_head():
    """Loss and gradients (accumulated in fp32) against the plain head under the same autocast,
    to bf16 precision (1% of the largest gradient)."""
    hidden, weight, targets = inputs(n=300, c=64, v=5000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(hidden, weight, targets)
        want = torch.autograd.grad(expected, (hidden, weight))
        got = linear_cross_entropy(hidden, weight, targets, IGNORE_INDEX, 64)
        grads = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
    for g, w in zip(grads, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=1e-2 * w.abs().max().item(), rtol=0)


def test_a_second_backward_through_the_same_graph_is_refused():
    """backward scales the saved gradients in place, so it may run once; autograd says so."""
    hidden, weight, targets = inputs()
    loss = linear_cross_entropy(hidden, weight, targets, IGNORE_INDEX, 16)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, targets, rows=16)
        assert got.grad_fn is None
        torch.testing.assert_close(got, plain(hidden, weight, targets), atol=1e-5, rtol=0)


def test_no_counted_target_gives_zero_loss_and_zero_gradient():
    hidden, weight, targets = inputs()
    targets[:] = IGNORE_INDEX
    loss = linear_cross_entropy(hidden, weight, targets, rows=16)
    loss.backward()
    assert loss.item() == 0.0 and not hidden.grad.any() and not weight.grad.any()


def test_gpt_training_forward_matches_the_plain_head(one_thread):
    """The model's loss and every parameter's gradient against logits + F.cross_entropy."""
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (3, 20))
    targets = torch.randint(0, GPT2_VOCAB_SIZE, (3, 20))
    targets[1, :5] = IGNORE_INDEX
    logits, _ = model(idx)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    reference = torch.autograd.grad(expected, list(model.parameters()))
    no_logits, loss = model(idx, targets)
    assert no_logits is None
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    for got, want in zip(grads, reference, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
