"""Log-likelihood of several continuations of one context, many examples per forward pass.

Each example (a context and its candidate endings) becomes one packed row: the context once, then
every ending, with an attention mask that lets an ending see the context and itself but not the
other endings, and position ids that restart after the context for each ending. Every ending is
thus scored exactly as in its own `context + ending` sequence, while the context is computed once
instead of once per ending, the last token of each ending (which predicts nothing we score) is left
out, and the vocabulary projection runs only where an ending token is predicted. On HellaSwag that
is about 2x fewer positions through the transformer and 3x fewer through the head than scoring
each `context + ending` row on its own. Rows are right-padded to the longest in the batch; padding
is never attended to and never scored.

Models: a minigpt `GPT`, or a transformers causal LM (e.g. `GPT2LMHeadModel`) through its base
model and output embeddings. `GPT.forward` only knows plain causal attention, so for our model the
packed forward is written here over its modules; tests check it against `GPT.forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minigpt.model import GPT

PAD_SEGMENT = -2
CONTEXT_SEGMENT = -1


@dataclass(frozen=True)
class Choices:
    """One example as token ids: a context and the endings to score after it."""

    context: list[int]
    endings: list[list[int]]


@dataclass
class Packed:
    """A batch of packed rows and where each scored token sits in it."""

    idx: torch.Tensor  # (B, L) token ids
    pos: torch.Tensor  # (B, L) position ids
    allowed: torch.Tensor  # (B, 1, L, L) bool: query may attend to key
    rows: torch.Tensor  # (K,) batch row of the position that predicts each scored token
    cols: torch.Tensor  # (K,) its column
    targets: torch.Tensor  # (K,) the token predicted there
    owner: torch.Tensor  # (K,) flat index of the (example, ending) the token belongs to


def pack(batch: list[Choices]) -> Packed:
    """Lay out each example as context + endings in one row (see the module docstring)."""
    length = max(packed_length(c) for c in batch)
    idx = torch.zeros(len(batch), length, dtype=torch.long)
    pos = torch.zeros(len(batch), length, dtype=torch.long)
    segment = torch.full((len(batch), length), PAD_SEGMENT, dtype=torch.long)
    rows, cols, targets, owner = [], [], [], []
    n_choices = 0
    for b, choices in enumerate(batch):
        n_ctx = len(choices.context)
        idx[b, :n_ctx] = torch.tensor(choices.context)
        pos[b, :n_ctx] = torch.arange(n_ctx)
        segment[b, :n_ctx] = CONTEXT_SEGMENT
        start = n_ctx
        for j, ending in enumerate(choices.endings):
            end = start + len(ending) - 1  # the ending's last token is not an input
            idx[b, start:end] = torch.tensor(ending[:-1])
            pos[b, start:end] = torch.arange(n_ctx, n_ctx + len(ending) - 1)
            segment[b, start:end] = j
            # ending token k is predicted by the previous token of its own sequence
            cols += [n_ctx - 1, *range(start, end)]
            rows += [b] * len(ending)
            targets += ending
            owner += [n_choices] * len(ending)
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


def packed_length(choices: Choices) -> int:
    """Positions `choices` takes in a packed row."""
    return len(choices.context) + sum(len(e) - 1 for e in choices.endings)


@torch.no_grad()
def score_batch(
    model: torch.nn.Module, batch: list[Choices], device: str | torch.device, vocab_size: int
) -> list[list[tuple[float, int]]]:
    """(sum of log-probs, token count) of each ending of each example in `batch`.

    Log-probabilities are normalised over the first `vocab_size` logits, so that a padded
    embedding (ours has 50,304 rows) scores the same as the model with the true vocabulary.
    """
    packed = pack(batch)
    hidden = _hidden_states(model, packed, device)
    picked = hidden[packed.rows.to(device), packed.cols.to(device)]
    logits = _output_head(model)(picked)[:, :vocab_size].float()
    # log p(target) without materialising the whole log-softmax
    target_logit = logits.gather(1, packed.targets.to(device)[:, None])[:, 0]
    logp = target_logit - torch.logsumexp(logits, dim=-1)
    n_choices = int(packed.owner.max()) + 1
    owner = packed.owner.to(device)
    sums = torch.zeros(n_choices, device=device, dtype=torch.float64)
    sums.index_add_(0, owner, logp.double())
    counts = torch.bincount(owner, minlength=n_choices).tolist()
    flat = list(zip(sums.tolist(), counts, strict=True))
    out, i = [], 0
    for choices in batch:
        out.append(flat[i : i + len(choices.endings)])
        i += len(choices.endings)
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    for attribute in ("module", "_orig_mod"):
        inner = getattr(model, attribute, None)
        if isinstance(inner, torch.nn.Module):
            return unwrap(inner)
    return model


def _hidden_states(model: torch.nn.Module, packed: Packed, device) -> torch.Tensor:
    idx, pos, allowed = (t.to(device) for t in (packed.idx, packed.pos, packed.allowed))
    if isinstance(model, GPT):
        return _gpt_hidden_states(model, idx, pos, allowed)
    # transformers: a 4-D additive mask is used as given, with explicit position ids
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    out = model.base_model(input_ids=idx, position_ids=pos, attention_mask=mask)
    return out.last_hidden_state


def _output_head(model: torch.nn.Module) -> torch.nn.Module:
    return model.lm_head if isinstance(model, GPT) else model.get_output_embeddings()


def _gpt_hidden_states(
    model: GPT, idx: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """`GPT.forward` up to the final LayerNorm, with an explicit attention mask and positions."""
    t = model.transformer
    x = t.wte(idx) + t.wpe(pos)
    for block in t.h:
        x = x + _masked_attention(block.attn, block.ln_1(x), allowed)
        x = x + block.mlp(block.ln_2(x))
    return t.ln_f(x)


def _masked_attention(attn, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (z.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return attn.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
