"""Multiple-choice tasks: an example is (context, choices, gold), scored by log-likelihood.

Every task is a loader plus a formatter from a dataset row to an `Example`; this module turns
examples into token sequences, scores them with the batched core (`scoring.py`), and computes
the metrics, following lm-evaluation-harness so that numbers compare with published ones:

- `acc`: the choice with the largest sum of log-probs;
- `acc_norm`: the largest sum of log-probs divided by the choice's length in characters
  (lm-eval's `acc_norm`; the length is that of the choice text, without the delimiter);
- `acc_per_token`: the largest mean log-prob per token (build-nanogpt's HellaSwag convention,
  which `minigpt` logged as `hellaswag_acc_norm` before the suite existed).

Text becomes tokens as lm-eval does: trailing spaces of a context move to its continuation, the
pair is encoded whole and the continuation is what follows the context's own encoding; an empty
context is `<|endoftext|>`; a sequence longer than the model's context loses its start.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from minigpt.errors import MinigptError
from minigpt.evals.scoring import Choice, context_length, score_requests
from minigpt.model import GPT2_VOCAB_SIZE
from minigpt.tokenizer import Tokenizer, get_tokenizer

EOT_ID = 50256


class BadRow(MinigptError, ValueError):
    """A dataset row that does not follow the task's schema (counted, never guessed at)."""


@dataclass(frozen=True)
class Example:
    """One question: choice i scores `continuations[i]` after `contexts[i]`."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    lengths: tuple[int, ...]  # characters that normalise acc_norm, per choice
    id: str | int | None = None

    @classmethod
    def from_choices(
        cls, context: str, choices: Sequence[str], gold: int, id=None, delimiter: str = " "
    ) -> Example:
        """The usual shape: one context, each choice after `delimiter` (lm-eval's default)."""
        _check(choices, gold)
        return cls(
            (context,) * len(choices),
            tuple(delimiter + c for c in choices),
            gold,
            tuple(len(c) for c in choices),
            id,
        )

    @classmethod
    def from_contexts(
        cls, contexts: Sequence[str], continuation: str, gold: int, id=None, delimiter: str = " "
    ) -> Example:
        """Partial scoring (Winogrande): several contexts, one continuation."""
        _check(contexts, gold)
        n = len(contexts)
        return cls(
            tuple(contexts), (delimiter + continuation,) * n, gold, (len(continuation),) * n, id
        )


def _check(options: Sequence[str], gold: int) -> None:
    if len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise BadRow(f"expected at least two non-empty choices, got {options!r}")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
        raise BadRow(f"answer {gold!r} is not a choice index 0..{len(options) - 1}")


@dataclass(frozen=True)
class Prediction:
    id: str | int | None
    gold: int
    pred: int  # by acc
    pred_norm: int  # by acc_norm
    pred_per_token: int  # by acc_per_token
    logprobs: list[float]
    tokens: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list, list]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [EOT_ID], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def to_choice(context_ids: list[int], continuation_ids: list[int], block_size: int) -> Choice:
    """The scored sequence, cut from the left to the model's context plus the last token."""
    if not continuation_ids:
        raise BadRow("a choice encodes to no tokens")
    tokens = (context_ids + continuation_ids)[-(block_size + 1) :]
    return Choice(tuple(tokens), min(len(continuation_ids), len(tokens) - 1))


def encode_example(example: Example, tokenizer: Tokenizer, block_size: int) -> list[Choice]:
    return [
        to_choice(*encode_pair(tokenizer, ctx, cont), block_size)
        for ctx, cont in zip(example.contexts, example.continuations, strict=True)
    ]


def predict(
    model: torch.nn.Module,
    examples: Sequence[Example],
    device: str | torch.device,
    batch_size: int = 16,
    tokenizer: Tokenizer | None = None,
    progress: Callable[[int], object] | None = None,
) -> list[Prediction]:
    """Predictions for `examples`, in order, `batch_size` examples per forward pass."""
    if batch_size < 1:
        raise MinigptError(f"batch size must be at least 1, got {batch_size}")
    tokenizer = tokenizer or get_tokenizer()
    block = context_length(model)
    requests = [encode_example(ex, tokenizer, block) for ex in examples]
    vocab = min(GPT2_VOCAB_SIZE, model.config.vocab_size)
    scores = score_requests(model, requests, device, vocab, batch_size, progress)
    return [_prediction(ex, s) for ex, s in zip(examples, scores, strict=True)]


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first of ties, as numpy's argmax


def _prediction(example: Example, scores) -> Prediction:
    logprobs = [s.logprob for s in scores]
    tokens = [s.tokens for s in scores]
    return Prediction(
        id=example.id,
        gold=example.gold,
        pred=_argmax(logprobs),
        pred_norm=_argmax([lp / n for lp, n in zip(logprobs, example.lengths, strict=True)]),
        pred_per_token=_argmax([lp / n for lp, n in zip(logprobs, tokens, strict=True)]),
        logprobs=logprobs,
        tokens=tokens,
    )


def tally(predictions: Sequence[Prediction], examples: Sequence[Example]) -> list[float]:
    """[examples, correct by acc, by acc_norm, by acc_per_token, summed chance of a random
    guess]: the counts ranks add up."""
    return [
        len(predictions),
        sum(p.pred == p.gold for p in predictions),
        sum(p.pred_norm == p.gold for p in predictions),
        sum(p.pred_per_token == p.gold for p in predictions),
        sum(1 / len(ex.contexts) for ex in examples),
    ]


def summarize(counts: Sequence[float], seconds: float) -> dict:
    """The metrics of `tally` counts scored in `seconds`; `random` is a random guess's
    expected accuracy (1 / number of choices, averaged over the examples)."""
    n, correct, norm, per_token, chance = counts
    n = int(n)
    return {
        "acc": correct / n if n else 0.0,
        "acc_norm": norm / n if n else 0.0,
        "acc_per_token": per_token / n if n else 0.0,
        "random": chance / n if n else 0.0,
        "n": n,
        "examples_per_sec": n / seconds if seconds > 0 else 0.0,
    }


def evaluate(
    model: torch.nn.Module,
    examples: Sequence[Example],
    device: str | torch.device,
    batch_size: int = 16,
    tokenizer: Tokenizer | None = None,
) -> dict:
    """`summarize` of `examples`, sharded across torch.distributed ranks when a process group
    is initialised (every rank must call, with the same examples; all get the totals)."""
    start = time.perf_counter()
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    mine = list(examples[rank::world])
    predictions = predict(model, mine, device, batch_size, tokenizer)
    counts = tally(predictions, mine)
    if world > 1:
        reduce_device = device if dist.get_backend() == "nccl" else "cpu"
        totals = torch.tensor(counts, dtype=torch.float64, device=reduce_device)
        dist.all_reduce(totals)
        counts = totals.tolist()
    return summarize(counts, time.perf_counter() - start)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
