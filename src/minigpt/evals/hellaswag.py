"""HellaSwag (Zellers et al., 2019): pick the most plausible of four endings of a short scene.

Scoring as in build-nanogpt and the seeds: each ending, prefixed with a space, is scored by the
model's log-likelihood given `ctx`. `acc` picks the ending with the largest sum of log-probs;
`acc_norm` the one with the smallest mean per-token loss (length-normalised, the completion-style
number GPT-2 papers quote). HellaSwag is plain text, so only GPT-2's 50,257 text tokens compete in
the softmax: an imported OpenAI GPT-2 scores exactly as it does in transformers. Sequences longer
than the model's context lose the start of the context (endings keep their first tokens).

Sources: the official JSONL file (the default, downloaded once from GitHub into ~/.cache/minigpt),
the hub copy `Rowan/hellaswag` through `datasets`, or a local JSONL / Arrow file or `save_to_disk`
directory; `label` may be an int or a digit string.

Contract for the trainer: `evaluate(model, examples, device, batch_size)` returns
{"acc", "acc_norm", "n", "examples_per_sec"}. Under torch.distributed every rank calls it with the
same examples; each scores its share and the counts are all-reduced, so every rank gets the totals.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from minigpt.errors import MinigptError
from minigpt.evals.scoring import Choices, packed_length, score_batch, unwrap
from minigpt.model import GPT2_VOCAB_SIZE
from minigpt.tokenizer import Tokenizer, get_tokenizer

OFFICIAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HUB_DATASET = "Rowan/hellaswag"
CACHE_DIR = Path(os.environ.get("MINIGPT_CACHE", Path.home() / ".cache" / "minigpt"))


class HellaSwagError(MinigptError, ValueError):
    """A HellaSwag source that cannot be read or does not follow the official schema."""


@dataclass(frozen=True)
class Example:
    ctx: str
    endings: tuple[str, ...]
    label: int
    ind: int | None = None  # the dataset's own id, kept for per-example output


@dataclass(frozen=True)
class Prediction:
    ind: int | None
    label: int
    pred: int  # argmax of summed log-probs (acc)
    pred_norm: int  # argmin of mean per-token loss (acc_norm)
    logprobs: list[float]  # summed log-prob of each ending
    lengths: list[int]  # tokens in each ending

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------ loading
def load_examples(
    source: str | os.PathLike | None = None, limit: int | None = None
) -> list[Example]:
    """HellaSwag validation examples from `source` (None: the official file), first `limit`."""
    if source is None:
        source = _download(OFFICIAL_URL)
    elif str(source) in (HUB_DATASET, "hub"):
        return _parse_rows(_hub_rows(), HUB_DATASET, limit)
    elif str(source).startswith(("http://", "https://")):
        source = _download(str(source))
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.arrow"))
        if not files:
            raise HellaSwagError(f"{path}: directory without .arrow files")
        rows = (row for file in files for row in _arrow_rows(file))
    elif path.suffix == ".arrow":
        rows = _arrow_rows(path)
    elif path.is_file():
        rows = _jsonl_rows(path)
    else:
        raise HellaSwagError(f"{path}: no such file or directory")
    return _parse_rows(rows, path, limit)


def _download(url: str) -> Path:
    target = CACHE_DIR / url.rsplit("/", 1)[-1]
    if not target.is_file():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        try:
            urllib.request.urlretrieve(url, tmp)
        except OSError as e:
            raise HellaSwagError(
                f"could not download {url} ({e}); pass a local file with --data"
            ) from e
        os.replace(tmp, target)
    return target


def _hub_rows() -> Iterator[dict]:
    try:
        import datasets

        yield from datasets.load_dataset(HUB_DATASET, split="validation")
    except Exception as e:  # offline, missing extra, hub changes: all mean "cannot have it"
        raise HellaSwagError(
            f"could not load {HUB_DATASET} from the hub ({type(e).__name__}: {e}); "
            "pass a local file with --data"
        ) from e


def _jsonl_rows(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise HellaSwagError(f"{path}: line {number} is not JSON ({e})") from e


def _arrow_rows(path: Path) -> Iterator[dict]:
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))
        try:
            table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:  # the random-access file format rather than a stream
            table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        raise HellaSwagError(f"{path}: not a readable Arrow file ({e})") from e
    yield from table.to_pylist()


def _parse_rows(rows, where: str | os.PathLike, limit: int | None) -> list[Example]:
    examples = []
    for number, row in enumerate(rows, 1):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(parse_example(row, f"{where}: row {number}"))
    if not examples:
        raise HellaSwagError(f"{where}: no examples")
    return examples


def parse_example(row: object, where: str) -> Example:
    """One record in the official schema (`ctx`, `endings`, `label`); errors name `where`."""
    if not isinstance(row, dict):
        raise HellaSwagError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("ctx", "endings", "label") if k not in row]
    if missing:
        raise HellaSwagError(f"{where}: missing field(s) {missing}; is this HellaSwag?")
    ctx, endings, label = row["ctx"], row["endings"], row["label"]
    if not isinstance(ctx, str) or not ctx:
        raise HellaSwagError(f"{where}: ctx must be a non-empty string, got {ctx!r}")
    if (
        not isinstance(endings, list)
        or len(endings) < 2
        or not all(isinstance(e, str) for e in endings)
    ):
        raise HellaSwagError(f"{where}: endings must be a list of strings, got {endings!r}")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise HellaSwagError(
            f"{where}: label {row['label']!r} is not an ending index 0..{len(endings) - 1}"
        )
    ind = row.get("ind")
    return Example(ctx, tuple(endings), label, ind if isinstance(ind, int) else None)


# ------------------------------------------------------------------------------------------ scoring
def encode(example: Example, tokenizer: Tokenizer, block_size: int) -> Choices:
    """Token ids of the context and of each " " + ending, cut to fit `block_size`."""
    endings = [tokenizer.encode(" " + e)[: block_size - 1] for e in example.endings]
    room = block_size - max(map(len, endings))  # at least 1: one context token is needed
    return Choices(tokenizer.encode(example.ctx)[-room:], endings)


def score_examples(
    model: torch.nn.Module,
    examples: list[Example],
    device: str | torch.device,
    batch_size: int = 16,
    tokenizer: Tokenizer | None = None,
) -> list[Prediction]:
    """Predictions for `examples`, in order, scoring `batch_size` examples per forward pass."""
    if batch_size < 1:
        raise HellaSwagError(f"batch size must be at least 1, got {batch_size}")
    model = unwrap(model)
    tokenizer = tokenizer or get_tokenizer()
    encoded = [encode(ex, tokenizer, _context_length(model)) for ex in examples]
    # longest first, so that batches hold similar lengths (little padding) and memory peaks early
    order = sorted(range(len(encoded)), key=lambda i: -packed_length(encoded[i]))
    scores: list = [None] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = score_batch(model, [encoded[i] for i in chunk], device, _text_vocab(model))
            for i, s in zip(chunk, batch, strict=True):
                scores[i] = s
    finally:
        model.train(was_training)
    return [_predict(ex, s) for ex, s in zip(examples, scores, strict=True)]


def _predict(example: Example, scores: list[tuple[float, int]]) -> Prediction:
    logprobs = [s for s, _ in scores]
    lengths = [n for _, n in scores]
    mean_loss = [-s / n for s, n in scores]
    return Prediction(
        ind=example.ind,
        label=example.label,
        pred=max(range(len(logprobs)), key=logprobs.__getitem__),
        pred_norm=min(range(len(mean_loss)), key=mean_loss.__getitem__),
        logprobs=logprobs,
        lengths=lengths,
    )


def evaluate(
    model: torch.nn.Module,
    examples: list[Example],
    device: str | torch.device,
    batch_size: int = 16,
    limit: int | None = None,
    tokenizer: Tokenizer | None = None,
) -> dict:
    """{"acc", "acc_norm", "n", "examples_per_sec"} over the first `limit` examples, sharded
    across torch.distributed ranks when a process group is initialised (all ranks must call)."""
    start = time.perf_counter()
    examples = examples[:limit]
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    predictions = score_examples(model, examples[rank::world], device, batch_size, tokenizer)
    counts = torch.tensor(tally(predictions), dtype=torch.int64, device=device)
    if world > 1:
        dist.all_reduce(counts)
    return summarize(counts.tolist(), time.perf_counter() - start)


def tally(predictions: list[Prediction]) -> list[int]:
    """[examples, correct by acc, correct by acc_norm]: the counts ranks add up."""
    return [
        len(predictions),
        sum(p.pred == p.label for p in predictions),
        sum(p.pred_norm == p.label for p in predictions),
    ]


def summarize(counts: list[int], seconds: float) -> dict:
    """The metrics of `tally` counts scored in `seconds`."""
    n, correct, correct_norm = counts
    return {
        "acc": correct / n if n else 0.0,
        "acc_norm": correct_norm / n if n else 0.0,
        "n": n,
        "examples_per_sec": n / seconds if seconds > 0 else 0.0,
    }


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _context_length(model: torch.nn.Module) -> int:
    config = model.config
    return getattr(config, "block_size", None) or config.max_position_embeddings


def _text_vocab(model: torch.nn.Module) -> int:
    return min(GPT2_VOCAB_SIZE, model.config.vocab_size)
