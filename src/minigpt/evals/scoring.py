"""Log-likelihood of several continuations, many examples per forward pass: the core every
multiple-choice task and the lm-evaluation-harness bridge score through.

A `Choice` is one token sequence whose last `n_scored` tokens are scored given the tokens before
them. One example's choices usually share a context (HellaSwag: the scene, then four endings), but
need not (Winogrande: two contexts, one continuation). Each example becomes one packed row: the
longest prefix its choices share (never a scored token) once, then each choice's remaining tokens,
with an attention mask that lets a choice see the shared prefix and itself but not the other
choices, and position ids that continue the prefix for each choice. Every choice is thus scored
exactly as in its own sequence, while the shared context is computed once, the last token of
each choice (which predicts nothing we score) is left out, and the vocabulary projection runs
only where a scored token is predicted. Rows are right-padded; padding is never attended to.

Numbers: log-probabilities come from fp32 logits (upcast after the head, also under autocast)
normalised over the first `vocab_size` logits, so that a padded embedding (ours has 50,304 rows)
scores as the true vocabulary does. On CUDA the forward runs under bf16 autocast (on GPUs that
have bf16) unless the caller already set an autocast, and the results stay on the
device until the last batch: one host sync per call, not per batch.

Models: a minigpt `GPT` through `GPT.hidden_states` (given the packed mask and positions) and
its head, or a transformers causal LM (e.g. `GPT2LMHeadModel`) through its base model and output
embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minigpt.device import inference_autocast
from minigpt.model import GPT

PAD_SEGMENT = -2
CONTEXT_SEGMENT = -1


@dataclass(frozen=True)
class Choice:
    """A token sequence whose last `n_scored` tokens are scored (at least one token precedes
    them: the first token of a sequence is never predicted)."""

    tokens: tuple[int, ...]
    n_scored: int


@dataclass(frozen=True)
class ChoiceScore:
    logprob: float  # sum of the scored tokens' log-probabilities
    tokens: int  # how many tokens were scored
    greedy: bool  # every scored token is the model's argmax (lm-eval's `is_greedy`)


@dataclass
class Packed:
    """A batch of packed rows and where each scored token sits in it."""

    idx: torch.Tensor  # (B, L) token ids
    pos: torch.Tensor  # (B, L) position ids
    allowed: torch.Tensor  # (B, 1, L, L) bool: query may attend to key
    rows: torch.Tensor  # (K,) batch row of the position that predicts each scored token
    cols: torch.Tensor  # (K,) its column
    targets: torch.Tensor  # (K,) the token predicted there
    owner: torch.Tensor  # (K,) index (within the batch) of the choice the token belongs to


def shared_prefix(choices: Sequence[Choice]) -> int:
    """Tokens at the start of every choice that are the same and scored in none."""
    limit = min(len(c.tokens) - c.n_scored for c in choices)
    first = choices[0].tokens
    n = 0
    while n < limit and all(c.tokens[n] == first[n] for c in choices):
        n += 1
    return n


def packed_length(choices: Sequence[Choice]) -> int:
    """Positions an example takes in a packed row."""
    n = shared_prefix(choices)
    return n + sum(len(c.tokens) - 1 - n for c in choices)


def pack(batch: Sequence[Sequence[Choice]]) -> Packed:
    """Lay out each example as shared prefix + choices in one row (see the module docstring)."""
    length = max(packed_length(c) for c in batch)
    idx = torch.zeros(len(batch), length, dtype=torch.long)
    pos = torch.zeros(len(batch), length, dtype=torch.long)
    segment = torch.full((len(batch), length), PAD_SEGMENT, dtype=torch.long)
    rows, cols, targets, owner = [], [], [], []
    n_choices = 0
    for b, choices in enumerate(batch):
        n = shared_prefix(choices)
        idx[b, :n] = torch.tensor(choices[0].tokens[:n], dtype=torch.long)
        pos[b, :n] = torch.arange(n)
        segment[b, :n] = CONTEXT_SEGMENT
        start = n
        for j, choice in enumerate(choices):
            own = choice.tokens[n:-1]  # the last token is never an input
            end = start + len(own)
            idx[b, start:end] = torch.tensor(own, dtype=torch.long)
            pos[b, start:end] = torch.arange(n, n + len(own))
            segment[b, start:end] = j
            # token t of the sequence is predicted at sequence position t - 1
            for t in range(len(choice.tokens) - choice.n_scored, len(choice.tokens)):
                cols.append(t - 1 if t - 1 < n else start + t - 1 - n)
            rows += [b] * choice.n_scored
            targets += choice.tokens[len(choice.tokens) - choice.n_scored :]
            owner += [n_choices] * choice.n_scored
            n_choices += 1
            start = end
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    allowed = causal & (same | (segment[:, None, :] == CONTEXT_SEGMENT))
    return Packed(
        idx=idx,
        pos=pos,
        allowed=allowed[:, None],
        rows=torch.tensor(rows),
        cols=torch.tensor(cols),
        targets=torch.tensor(targets),
        owner=torch.tensor(owner),
    )


def check_choice(choice: Choice, block_size: int) -> None:
    if not 1 <= choice.n_scored < len(choice.tokens) or len(choice.tokens) > block_size + 1:
        raise ValueError(
            f"a choice of {len(choice.tokens)} tokens scoring {choice.n_scored} does not fit a "
            f"context of {block_size}"
        )


@torch.no_grad()
def score_requests(
    model: torch.nn.Module,
    requests: Sequence[Sequence[Choice]],
    device: str | torch.device,
    vocab_size: int,
    batch_size: int = 16,
    progress=None,
) -> list[list[ChoiceScore]]:
    """The score of every choice of every request, `batch_size` requests per forward pass.

    `progress`, if given, is called with the number of requests each batch finished."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    model = unwrap(model)
    device = torch.device(device)
    block = context_length(model)
    for choices in requests:
        for choice in choices:
            check_choice(choice, block)
    # longest first, so that batches hold similar lengths (little padding) and memory peaks early
    order = sorted(range(len(requests)), key=lambda i: -packed_length(requests[i]))
    offsets, total = [], 0
    for choices in requests:
        offsets.append(total)
        total += len(choices)
    sums = torch.zeros(total, dtype=torch.float64, device=device)
    misses = torch.zeros(total, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with inference_autocast(model, device):
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                packed = pack([requests[i] for i in chunk])
                # where each batch-local choice lands in the flat output
                flat = torch.tensor(
                    [offsets[i] + j for i in chunk for j in range(len(requests[i]))]
                )
                owner = to_device(flat[packed.owner], device)
                logp, hit = _score_packed(model, packed, device, vocab_size)
                sums.index_add_(0, owner, logp.double())
                misses.index_add_(0, owner, (~hit).long())
                if progress is not None:
                    progress(len(chunk))
    finally:
        model.train(was_training)
    sums_host, misses_host = sums.tolist(), misses.tolist()  # the one sync
    out = []
    for i, choices in enumerate(requests):
        base = offsets[i]
        out.append(
            [
                ChoiceScore(sums_host[base + j], c.n_scored, misses_host[base + j] == 0)
                for j, c in enumerate(choices)
            ]
        )
    return out


def _score_packed(
    model: torch.nn.Module, packed: Packed, device: torch.device, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob, is-argmax) of every scored token of `packed`, on the device."""
    hidden = _hidden_states(model, packed, device)
    picked = hidden[to_device(packed.rows, device), to_device(packed.cols, device)]
    logits = _output_head(model)(picked)[:, :vocab_size].float()
    targets = to_device(packed.targets, device)
    # log p(target) without materialising the whole log-softmax
    target_logit = logits.gather(1, targets[:, None])[:, 0]
    return target_logit - torch.logsumexp(logits, dim=-1), logits.argmax(dim=-1) == targets


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copies that do not block the host (pinned memory) on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    for attribute in ("module", "_orig_mod"):
        inner = getattr(model, attribute, None)
        if isinstance(inner, torch.nn.Module):
            return unwrap(inner)
    return model


def context_length(model: torch.nn.Module) -> int:
    config = unwrap(model).config
    return getattr(config, "block_size", None) or config.max_position_embeddings


def _hidden_states(model: torch.nn.Module, packed: Packed, device) -> torch.Tensor:
    idx, pos, allowed = (to_device(t, device) for t in (packed.idx, packed.pos, packed.allowed))
    if isinstance(model, GPT):
        return model.hidden_states(idx, pos=pos, attn_mask=allowed)
    # transformers: a 4-D additive mask is used as given, with explicit position ids
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    out = model.base_model(input_ids=idx, position_ids=pos, attention_mask=mask)
    return out.last_hidden_state


def _output_head(model: torch.nn.Module) -> torch.nn.Module:
    return model.lm_head if isinstance(model, GPT) else model.get_output_embeddings()
