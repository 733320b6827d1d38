"""HellaSwag (Zellers et al., 2019): pick the most plausible of four endings of a short scene.

Format as lm-evaluation-harness's `hellaswag`: the prompt is "activity: ctx_a Ctx_b", the WikiHow
bracket artefacts removed, and each cleaned ending is scored after a space. `acc_norm` is lm-eval's
(per character), `acc_per_token` the mean per-token log-prob that build-nanogpt reports.
HellaSwag is plain text, so only GPT-2's 50,257 text tokens compete in the softmax.

Sources: the offline copy (`make eval-data`) when present, else the official JSONL file
(downloaded once from GitHub into ~/.cache/minigpt), the hub copy `Rowan/hellaswag`, a URL, or a
local JSONL / Arrow file or `save_to_disk` directory; `label` may be an int or a digit string.

Under torchrun, `fetch` runs on each node's local rank 0 while the other ranks wait (see
`train/pretrain.py`); downloads go to a temporary file unique to the process, then are renamed.
"""

from __future__ import annotations

import os
import re
import tempfile
import urllib.request
from pathlib import Path

import torch

from minigpt.errors import MinigptError
from minigpt.evals import multiple_choice
from minigpt.evals.data import Dataset, cache_dir, find_offline_store
from minigpt.evals.multiple_choice import BadRow, Example
from minigpt.evals.task import Loaded, Task
from minigpt.tokenizer import Tokenizer

OFFICIAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HUB_DATASET = "Rowan/hellaswag"
CACHE_DIR = cache_dir()


class HellaSwagError(MinigptError, ValueError):
    """A HellaSwag source that cannot be had or read."""


def preprocess(text: str) -> str:
    """lm-eval's cleanup: WikiHow's "[title]" markers become sentence ends, other brackets go."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def hellaswag(row: dict) -> Example:
    label = row["label"]
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    endings = row["endings"]
    if not isinstance(endings, list):
        raise BadRow(f"endings must be a list of strings, got {endings!r}")
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return Example.from_choices(
        preprocess(row["activity_label"] + ": " + context),
        [preprocess(e) for e in endings],
        label,
        row.get("ind"),
    )


TASK = Task("hellaswag", "HellaSwag", Dataset("hellaswag/none/validation", HUB_DATASET), hellaswag)
TASKS = [TASK]


def fetch(source: str | os.PathLike | None = None, data_dir=None) -> str | os.PathLike | None:
    """The source to read, after downloading it if it is the official file or a URL (once, into
    the cache). The one step that may need the network."""
    if source is None:
        store = find_offline_store(data_dir)
        if store is not None and store.has(TASK.dataset.offline):
            return None
        return _download(OFFICIAL_URL)
    if str(source).startswith(("http://", "https://", "file://")):
        return _download(str(source))
    return source


def load(
    source: str | os.PathLike | None = None, limit: int | None = None, data_dir=None
) -> Loaded:
    """HellaSwag validation examples (see the module docstring for sources), first `limit`."""
    return TASK.load(fetch(source, data_dir), data_dir, limit)


def load_examples(
    source: str | os.PathLike | None = None, limit: int | None = None, data_dir=None
) -> list[Example]:
    return load(source, limit, data_dir).examples


def _download(url: str) -> Path:
    target = CACHE_DIR / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # a name of its own per process, so that concurrent downloads never share a half-written file
    fd, tmp = tempfile.mkstemp(dir=CACHE_DIR, prefix=target.name + ".", suffix=".part")
    os.close(fd)
    try:
        urllib.request.urlretrieve(url, tmp)
        os.replace(tmp, target)
    except OSError as e:
        raise HellaSwagError(
            f"could not download {url} ({e}); without network, run `make eval-data` for the "
            "offline copy or point at a local file: --data for `minigpt eval`, "
            "eval.task.hellaswag.data (formerly eval.hellaswag_data) in a training config"
        ) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def evaluate(
    model: torch.nn.Module,
    examples: list[Example],
    device: str | torch.device,
    batch_size: int = 16,
    limit: int | None = None,
    tokenizer: Tokenizer | None = None,
) -> dict:
    """{"acc", "acc_norm", "acc_per_token", "random", "n", "examples_per_sec"} over the first
    `limit` examples, sharded across torch.distributed ranks (all ranks must call)."""
    return multiple_choice.evaluate(model, examples[:limit], device, batch_size, tokenizer)
