"""The output layer and cross-entropy in row chunks, so (B, T, V) logits never exist at once.

At the GPT-2 recipe's micro-batch the full logits are 64 x 1024 x 50,304 (6.6 GB in bf16, more
with their fp32 copy and gradient), held through backward; on a CPU their memory traffic dominates
a small model's step. `linear_cross_entropy` computes, one chunk of rows at a time, the logits,
the loss and (when training) the gradients with respect to the hidden states and the head weight
(softmax minus one-hot, times the chunk); backward only scales them by the incoming gradient. The
matmuls are the plain path's three, run during forward (under autocast in its dtype, as the plain
path's are, the weight gradient summed over chunks in fp32): the idea of Liger-Kernel's fused
linear cross-entropy, written in plain PyTorch so that it runs on every device and under
torch.compile.

Contract: the mean cross-entropy of `hidden @ weight.T` (scored in fp32 whatever autocast chose
for the matmul) against `targets`, ignoring `ignore_index`: `F.cross_entropy(F.linear(hidden,
weight).float(), targets)`, except that no counted target gives 0, not NaN, so a fully masked
micro-batch adds nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# Logits per chunk, by device. CPUs: 8M (32 MB in fp32, 166 rows of GPT-2's vocabulary), a
# working set the caches help with (measured fastest on the demo shape). GPUs: 128M (2,668 rows),
# big matmuls and few read-modify-writes of the (V, C) weight gradient that every chunk adds to.
CHUNK_ELEMENTS = {"cpu": 2**23, "cuda": 2**27}


def chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk for a vocabulary of `vocab_size` on `device`."""
    return max(1, CHUNK_ELEMENTS.get(device.type, 2**23) // vocab_size)


def _chunk_logits(h, weight, out):
    """fp32 logits of one chunk; written into `out` (a buffer reused by every chunk) when given.
    A fresh (rows, V) tensor per chunk costs page faults on CPUs (large blocks are mmap'ed and
    returned to the OS on free): reusing one made the chunk's matmul 1.2-1.35x faster there."""
    if out is None:
        return F.linear(h, weight).float()
    return torch.mm(h, weight.t(), out=out[: h.size(0)])


def _logits_buffer(hidden, weight, rows):
    """One fp32 (rows, V) buffer for every chunk's logits, where the matmul yields fp32 itself
    (fp32 inputs, no autocast) and the allocator does not cache blocks (CPUs); else None."""
    plain_fp32 = hidden.dtype == weight.dtype == torch.float32
    if hidden.device.type != "cpu" or not plain_fp32 or torch.is_autocast_enabled("cpu"):
        return None
    return hidden.new_empty((min(rows, hidden.size(0)), weight.size(0)))


def _chunk_loss(h, weight, y, keep, out=None):
    """The summed loss of one chunk (no gradients: log-sum-exp of its fp32 logits)."""
    logits = _chunk_logits(h, weight, out)
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
    return ((lse - picked) * keep).sum()


def _softmax_and_losses(h, weight, y, keep, out=None):
    """The softmax of one chunk's logits, computed in place in one fp32 buffer (fewer passes
    over memory than log-sum-exp then softmax), and the chunk's summed loss."""
    logits = _chunk_logits(h, weight, out)
    picked = logits.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
    top = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(top).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    lse = (top + total.log()).squeeze(1)
    return probs.div_(total), ((lse - picked) * keep).sum()


def _matmul_dtype(weight):
    """The dtype the head's matmuls run in: autocast's for the weight's device when it is on and
    would cast this weight (fp32), else the weight's own."""
    device = weight.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, rows: int):
        keep = targets != ignore_index
        scale = 1.0 / keep.sum().clamp(min=1).float()
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        # accumulated over chunks in fp32 at least (float64 stays float64)
        grad_weight = torch.empty_like(
            weight, dtype=torch.promote_types(weight.dtype, torch.float32)
        )
        # every matmul in autocast's dtype when it is on: it casts for the logits and the hidden
        # gradient, but not for out= and in-place matmuls, so the weight gradient's ran in fp32.
        # A lower-precision chunk's weight gradient lands in one reused buffer, then is added to
        # the fp32 sum (no CPU kernel takes bf16 inputs and writes an fp32 output).
        dtype = _matmul_dtype(weight)
        w = weight.to(dtype)
        partial = None if dtype == grad_weight.dtype else torch.empty_like(weight, dtype=dtype)
        index = torch.arange(min(rows, hidden.size(0)), device=hidden.device)
        buffer = _logits_buffer(hidden, weight, rows)
        for start in range(0, hidden.size(0), rows):
            h, y, k = (t[start : start + rows] for t in (hidden, targets, keep))
            h = h.to(dtype)
            grad, loss = _softmax_and_losses(h, w, y, k, buffer)
            total += loss
            # d(-log p_y)/d(logits) = softmax - one_hot, zero on ignored rows; in place
            grad[index[: len(y)], y.clamp(min=0)] -= 1.0
            grad = grad.mul_(k.unsqueeze(1)).to(dtype)
            grad_hidden[start : start + rows] = grad @ w
            if partial is None and start == 0:  # the first chunk writes it: no zero-fill pass
                torch.mm(grad.T, h, out=grad_weight)
            elif partial is None:
                grad_weight.addmm_(grad.T, h)
            elif start == 0:
                grad_weight.copy_(torch.mm(grad.T, h, out=partial))
            else:
                grad_weight.add_(torch.mm(grad.T, h, out=partial))
        ctx.save_for_backward(grad_hidden, grad_weight, scale)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        g = grad_output * scale
        # in place: no second (V, C) tensor; a second backward through the graph would find the
        # saved tensors modified, and autograd refuses that with its own error
        dh = grad_hidden.mul_(g.to(grad_hidden.dtype))
        dw = grad_weight.mul_(g).to(ctx.weight_dtype)
        return dh, dw, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    rows: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden (N, C) @ weight (V, C).T` against `targets (N,)`, computed
    `rows` rows at a time (default: `chunk_rows(V, device)`) without materialising (N, V)
    logits."""
    rows = rows or chunk_rows(weight.size(0), hidden.device)
    # equal chunks no larger than `rows`: 512 rows in 166s would leave a 14-row tail whose matmul
    # runs at a third of the others' speed on CPUs; 4 x 128 does not
    chunks = max(1, -(-hidden.size(0) // rows))
    rows = -(-hidden.size(0) // chunks)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, rows)
    keep = targets != ignore_index
    total = hidden.new_zeros((), dtype=torch.float32)
    buffer = _logits_buffer(hidden, weight, rows)
    for start in range(0, hidden.size(0), rows):
        h, y, k = (t[start : start + rows] for t in (hidden, targets, keep))
        total += _chunk_loss(h, weight, y, k, buffer)
    return total / keep.sum().clamp(min=1).float()


@torch.no_grad()
def head_cross_entropy(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    vocab_size: int,
    targets: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """`linear_cross_entropy` for a head with no weight matrix to hand (an int8 `Int8Linear`):
    each chunk's logits come from `head(chunk)`. Inference only: no gradients."""
    rows = chunk_rows(vocab_size, hidden.device)
    keep = targets != ignore_index
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), rows):
        h, y, k = (t[start : start + rows] for t in (hidden, targets, keep))
        logits = head(h).float()
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
        total += ((lse - picked) * k).sum()
    return total / keep.sum().clamp(min=1).float()
