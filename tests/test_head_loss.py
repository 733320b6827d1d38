"""The chunked output layer + cross-entropy against the plain one-shot computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
