"""Sources -> token shards: what `minigpt prepare` does.

A source is an iterator of document strings: the bundled Shakespeare corpus, local files
(.txt = one document per file, .jsonl and .parquet with a text field), any Hugging Face dataset
(hub name or a `save_to_disk` directory) or FineWeb-Edu from the hub. Every document is written as
`<|endoftext|>` followed by its plain-text GPT-2 tokens, so the EOT token delimits documents.

Throughput: a reader thread parses files into batches of a few MB of text while tiktoken's batch
encoder (Rust, GIL released) tokenizes the previous batch on `workers` threads; the writer holds at
most one shard in memory. Shards appear atomically as they fill and `manifest.json` is written
last, so a dataset directory is complete exactly when it has a manifest.

A Python caller builds a `Corpus` (`builtin_corpus`, `files_corpus`, `hf_corpus`,
`fineweb_edu_corpus`) and hands it to `prepare_corpus`; `minigpt prepare` (minigpt.cli.prepare)
only maps its flags onto these.
"""

from __future__ import annotations

import glob
import itertools
import json
import lzma
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import orjson
from tqdm import tqdm

from minigpt.data.shards import (
    MANIFEST,
    ShardError,
    TokenShardWriter,
    read_manifest,
    read_shard,
    write_manifest,
)
from minigpt.errors import MinigptError
from minigpt.tokenizer import EOT, Tokenizer, get_tokenizer

BATCH_CHARS = 4_000_000  # text per tokenizer call: large enough to keep every thread busy
FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
MAX_ERROR_EXAMPLES = 20


@dataclass
class SourceStats:
    """What reading a source found, recorded in the manifest."""

    undecodable_bytes: int = 0  # bytes that were not UTF-8, decoded as U+FFFD
    skipped_records: int = 0  # malformed records skipped under --on-error skip
    errors: list[str] = field(default_factory=list)  # the first few skipped records, for the user

    def skip(self, message: str) -> None:
        self.skipped_records += 1
        if len(self.errors) < MAX_ERROR_EXAMPLES:
            self.errors.append(message)

    def decode(self, data: bytes) -> str:
        """UTF-8 with undecodable bytes replaced by U+FFFD and counted."""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("utf-8", errors="replace")
            # "replace" folds a run of bad bytes into one U+FFFD, so count bytes separately
            self.undecodable_bytes += _count_undecodable(data)
            return text


def _count_undecodable(data: bytes) -> int:
    # surrogateescape maps each undecodable byte to one lone surrogate U+DC80..U+DCFF
    return len(_ESCAPED_BYTE.findall(data.decode("utf-8", errors="surrogateescape")))


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


# ------------------------------------------------------------------------------------ sources
def builtin_documents() -> Iterator[str]:
    """The bundled corpus: 42 Shakespeare works (modern spelling, public domain), one per doc."""
    blob = resources.files("minigpt.assets").joinpath("shakespeare.jsonl.xz").read_bytes()
    for line in lzma.decompress(blob).decode("utf-8").splitlines():
        yield json.loads(line)["text"]


def expand_patterns(patterns: list[str]) -> list[Path]:
    """Files named by paths or glob patterns, in order, each once; every pattern must match."""
    files: list[Path] = []
    seen: set[Path] = set()  # a list's `in` would compare every pair of paths: slow for 10k files
    for pattern in patterns:
        matches = (
            sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        )
        matches = [m for m in matches if not os.path.isdir(m)]
        if not matches:
            raise MinigptError(f"{pattern!r} matches no files; check the path or quote the glob")
        for match in matches:
            path = Path(match)
            if not path.is_file():
                raise MinigptError(f"{path}: no such file")
            if path.suffix not in FILE_READERS:
                raise MinigptError(
                    f"{path}: unsupported file type {path.suffix!r}; use .txt, .jsonl or .parquet"
                )
            if path not in seen:
                seen.add(path)
                files.append(path)
    return files


def file_documents(
    files: list[Path], text_field: str, on_error: str, stats: SourceStats
) -> Iterator[str]:
    for path in files:
        if path.stat().st_size == 0:
            _bad_record(f"{path}: file is empty", on_error, stats)
            continue
        yield from FILE_READERS[path.suffix](path, text_field, on_error, stats)


def _bad_record(message: str, on_error: str, stats: SourceStats) -> None:
    if on_error == "stop":
        raise MinigptError(f"{message} (pass --on-error skip to skip such records and count them)")
    stats.skip(message)


def _text_documents(path: Path, text_field: str, on_error: str, stats: SourceStats):
    yield stats.decode(path.read_bytes())


def _jsonl_documents(path: Path, text_field: str, on_error: str, stats: SourceStats):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            # fast path: orjson parses 3-4x faster than json (less time holding the GIL that
            # the tokenizer threads need). It is stricter (invalid UTF-8, lone surrogates, NaN
            # fail), so everything but a good record falls through to json, which decides
            # exactly as before and words the errors.
            try:
                text = orjson.loads(raw)[text_field]
            except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
                text = None
            if isinstance(text, str):
                yield text
                continue
            try:
                record = json.loads(stats.decode(raw))
            except json.JSONDecodeError as e:
                _bad_record(f"{path}:{lineno}: not valid JSON ({e.msg})", on_error, stats)
                continue
            text = _text_of(record, text_field, f"{path}:{lineno}", on_error, stats)
            if text is not None:
                yield text


def _text_of(record, text_field: str, where: str, on_error: str, stats: SourceStats):
    if not isinstance(record, dict):
        _bad_record(
            f"{where}: expected a JSON object, got {type(record).__name__}", on_error, stats
        )
        return None
    if text_field not in record:
        keys = ", ".join(sorted(record)) or "none"
        _bad_record(
            f"{where}: no {text_field!r} field (fields: {keys}); pick one with --text-field",
            on_error,
            stats,
        )
        return None
    text = record[text_field]
    if not isinstance(text, str):
        _bad_record(f"{where}: {text_field!r} is {type(text).__name__}, not text", on_error, stats)
        return None
    return text


def _parquet_documents(path: Path, text_field: str, on_error: str, stats: SourceStats):
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise MinigptError(f"{path}: not a readable Parquet file ({e})") from e
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise MinigptError(
            f"{path}: no {text_field!r} column (columns: {', '.join(columns)}); "
            "pick one with --text-field"
        )
    for batch in parquet.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield text
            else:
                _bad_record(f"{path}: a row has a null {text_field!r}", on_error, stats)


FILE_READERS: dict[str, Callable] = {
    ".txt": _text_documents,
    ".jsonl": _jsonl_documents,
    ".parquet": _parquet_documents,
}


def looks_like_path(name: str) -> bool:
    """Whether `name` means a local directory rather than a hub id: it starts as a path does,
    or its first part exists here (data/mine, with a data/ folder)."""
    if name.startswith(("./", "../", "/", "~")) or name in (".", ".."):
        return True
    parts = Path(name).parts
    return len(parts) > 1 and Path(parts[0]).exists()


HUB_PROBE_SECONDS = 3.0


def check_hub_reachable() -> None:
    """Fail at once when the hub cannot be reached: otherwise `datasets` retries for ~24 s
    before its own error. HF_HUB_OFFLINE=1 skips the probe (the local cache alone is read)."""
    import urllib.error
    import urllib.request

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "on", "yes", "true"):
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(
            urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_SECONDS
        ).close()
    except urllib.error.HTTPError:
        return  # the hub answered, even if with an error status: it is reachable
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise MinigptError(
            f"cannot reach the Hugging Face hub at {endpoint} ({reason}); check your network, "
            "set HF_HUB_OFFLINE=1 to read datasets already in the local cache, or pass a local "
            "directory"
        ) from e


def hf_documents(
    dataset: str, config: str | None, split: str, text_field: str, streaming: bool
) -> Iterator[str]:
    """Documents of a hub dataset (streamed) or of a local `save_to_disk` directory."""
    try:
        import datasets
    except ImportError as e:
        raise MinigptError(
            "Hugging Face datasets are not installed: pip install 'minigpt[hf]'"
        ) from e
    if Path(dataset).expanduser().is_dir():
        data = datasets.load_from_disk(str(Path(dataset).expanduser()))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise MinigptError(f"{dataset}: no split {split!r} (splits: {', '.join(data)})")
            data = data[split]
    else:
        if looks_like_path(dataset):
            raise MinigptError(
                f"{dataset}: no such directory; pass a directory written by save_to_disk, "
                "or a hub name such as user/name"
            )
        check_hub_reachable()
        try:
            data = datasets.load_dataset(dataset, config, split=split, streaming=streaming)
        except Exception as e:  # network, auth, unknown name: all end the same way for the user
            raise MinigptError(
                f"could not load {dataset!r} (config {config}, split {split}) from the Hugging Face "
                f"hub: {e}. Check the name and your network, or pass a local directory"
            ) from e
    columns = data.column_names
    if columns is not None and text_field not in columns:
        raise MinigptError(
            f"{dataset}: no {text_field!r} column (columns: {', '.join(columns)}); "
            "pick one with --text-field"
        )
    for index, row in enumerate(data):
        text = row[text_field]
        if not isinstance(text, str):
            raise MinigptError(f"{dataset}: row {index} has a non-text {text_field!r}: {text!r}")
        yield text


# ------------------------------------------------------------------------------------ corpora
@dataclass
class Corpus:
    """Documents to prepare, the name their shards take, and the `source` that the manifest
    records (re-preparing the same source into a finished directory is a no-op)."""

    name: str
    source: dict
    documents: Iterable[str]
    stats: SourceStats = field(default_factory=SourceStats)

    def limited(self, max_docs: int) -> Corpus:
        """Only the first `max_docs` documents, as the source records."""
        docs = itertools.islice(self.documents, max_docs)
        return Corpus(self.name, {**self.source, "limit_docs": max_docs}, docs, self.stats)


def builtin_corpus() -> Corpus:
    """The bundled Shakespeare corpus."""
    return Corpus("shakespeare", {"kind": "builtin", "corpus": "shakespeare"}, builtin_documents())


def files_corpus(
    patterns: list[str], *, text_field: str = "text", on_error: str = "stop"
) -> Corpus:
    """Local .txt / .jsonl / .parquet files named by paths or globs; a malformed record stops
    the run (`on_error="stop"`) or is skipped and counted (`"skip"`)."""
    files = expand_patterns(patterns)
    source = {"kind": "files", "files": [str(p.resolve()) for p in files], "text_field": text_field}
    stats = SourceStats()
    return Corpus("files", source, file_documents(files, text_field, on_error, stats), stats)


def hf_corpus(
    dataset: str,
    *,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    streaming: bool = True,
) -> Corpus:
    """A Hugging Face hub dataset, or a directory written by `save_to_disk`."""
    source = {
        "kind": "hf",
        "dataset": dataset,
        "config": config,
        "split": split,
        "text_field": text_field,
    }
    return Corpus("hf", source, hf_documents(dataset, config, split, text_field, streaming))


def fineweb_edu_corpus(config: str = "sample-10BT") -> Corpus:
    """FineWeb-Edu's train split, streamed from the hub."""
    source = {"kind": "hf", "dataset": FINEWEB_EDU, "config": config, "split": "train"}
    docs = hf_documents(FINEWEB_EDU, config, "train", "text", streaming=True)
    return Corpus("fineweb-edu", source, docs)


# --------------------------------------------------------------------------------- tokenizing
def batched_texts(
    documents: Iterable[str], batch_chars: int | None = None, min_docs: int = 1
) -> Iterator[list[str]]:
    """Lists of documents of at least `batch_chars` characters and `min_docs` documents (the
    last may be smaller): a document is tokenized by one thread, so a batch of one big file
    would leave the other workers idle."""
    batch_chars = batch_chars or BATCH_CHARS
    batch: list[str] = []
    size = 0
    for doc in documents:
        batch.append(doc)
        size += len(doc)
        if size >= batch_chars and len(batch) >= min_docs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Run `iterator` in a background thread, `depth` items ahead; re-raise its errors here."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterator:
                if stop.is_set():
                    return
                items.put(item)
            items.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer and re-raised there
            items.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def documents_to_tokens(documents: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """The documents' tokens as one uint16 array, each document preceded by the EOT token.

    One tiktoken call per chunk, not per document: each call takes the GIL back, and while the
    reader thread parses (JSONL) the workers then waited a switch interval per document. tiktoken
    splits its input at allowed special tokens and encodes each piece on its own, so
    EOT + EOT.join(docs) gives exactly the per-document tokens unless a document itself
    contains the EOT text (then, as plain text, it must not split): such chunks go one by one."""
    if not documents:
        return np.empty(0, np.uint16)
    try:
        return _encode_chunk(documents, tokenizer)
    except UnicodeEncodeError:
        # lone surrogates (JSON "\\ud800") cannot be UTF-8: U+FFFD, as tiktoken's encode does
        fixed = [
            doc.encode("utf-16", "surrogatepass").decode("utf-16", "replace") for doc in documents
        ]
        return _encode_chunk(fixed, tokenizer)


def _encode_chunk(documents: list[str], tokenizer: Tokenizer) -> np.ndarray:
    if not any(EOT in doc for doc in documents):
        return tokenizer.encode_documents_to_numpy(documents).astype(np.uint16)
    eot = np.array([tokenizer.eot_id], dtype=np.uint32)
    parts = [eot] * (2 * len(documents))
    parts[1::2] = [tokenizer.encode_to_numpy(doc) for doc in documents]
    return np.concatenate(parts).astype(np.uint16)


def split_evenly(batch: list[str], n: int) -> list[list[str]]:
    """At most n runs of consecutive documents with about equal characters each, so that
    threads finish together when document sizes vary."""
    ends = np.cumsum([len(doc) for doc in batch])
    cuts = np.searchsorted(ends, ends[-1] * np.arange(1, n) / n, side="right")
    bounds = [0, *sorted(set(cuts.tolist()) - {0, len(batch)}), len(batch)]
    return [batch[a:b] for a, b in itertools.pairwise(bounds)]


def tokenize_documents(
    documents: Iterable[str], tokenizer: Tokenizer, workers: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(number of documents, their tokens with EOT prefixes) per batch, in document order.

    A reader thread parses the next batch while `workers` threads tokenize this one in chunks;
    tiktoken encodes straight into numpy buffers with the GIL released, so no per-token Python
    objects are ever made."""
    with ThreadPoolExecutor(workers) as pool:
        for batch in prefetch(batched_texts(documents, min_docs=workers)):
            chunks = split_evenly(batch, 8 * workers)
            parts = pool.map(documents_to_tokens, chunks, itertools.repeat(tokenizer))
            yield len(batch), np.concatenate(list(parts))


# ------------------------------------------------------------------------------------ datasets
def prepare_dataset(
    out: str | os.PathLike,
    name: str,
    source: dict,
    documents: Iterable[str],
    *,
    shard_tokens: int,
    val_tokens: int | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    stats: SourceStats | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize `documents` into shards in `out`; returns the manifest.

    `source` describes where the documents come from (it is recorded, and re-running with the
    same source and settings into a finished directory is a no-op). The first `val_tokens`
    tokens are the validation split; by default one shard, or for a corpus that one shard would
    swallow whole, `small_corpus_val_tokens` of it (the manifest's `val_split` says so).
    """
    out = Path(out)
    if val_tokens is not None and val_tokens < 1:
        raise MinigptError(
            f"--val-tokens {val_tokens}: train and eval loss need a validation split; pass at "
            "least 1 token, or leave it out for one shard"
        )
    tokenizer = get_tokenizer()
    stats = stats or SourceStats()
    default_split = val_tokens is None
    val_tokens = shard_tokens if val_tokens is None else val_tokens
    settings = {"shard_tokens": shard_tokens, "val_tokens": val_tokens}
    finished = _check_output_dir(out, name, tokenizer, source, settings, overwrite)
    if finished is not None:
        return finished
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _write_dataset(
            out, name, source, documents, settings, default_split, workers, stats, progress
        )
    except MinigptError:
        if created:  # a user's mistake: leave no directory behind that prepare made
            shutil.rmtree(out, ignore_errors=True)
        raise
    except BaseException:
        if created and not any(out.iterdir()):  # a crash keeps whole shards for the next run
            out.rmdir()
        raise


def _write_dataset(
    out: Path,
    name: str,
    source: dict,
    documents: Iterable[str],
    settings: dict,
    default_split: bool,
    workers: int | None,
    stats: SourceStats,
    progress: bool,
) -> dict:
    """Shards and the manifest of a fresh `prepare_dataset` run."""
    tokenizer = get_tokenizer()
    shard_tokens, val_tokens = settings["shard_tokens"], settings["val_tokens"]
    writer = TokenShardWriter(out, name, shard_tokens=shard_tokens, val_tokens=val_tokens)
    n_docs = 0
    start = time.perf_counter()
    bar = tqdm(desc=f"prepare {name}", unit=" docs", disable=not progress, dynamic_ncols=True)
    for count, tokens in tokenize_documents(documents, tokenizer, workers or os.cpu_count() or 1):
        writer.add(tokens)
        n_docs += count
        bar.update(count)
        rate = writer.total / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{writer.total:,} tokens, {rate:,.0f} tokens/s")
    bar.close()
    shards = writer.close()
    elapsed = time.perf_counter() - start
    if n_docs == 0:
        raise MinigptError(f"source {source} yielded no documents; nothing to prepare")
    split_tokens = {
        s: sum(x["tokens"] for x in shards if x["split"] == s) for s in ("train", "val")
    }
    val_split = None
    if split_tokens["train"] == 0 and default_split and writer.total >= 4:  # 2 per split
        shards, val_tokens = _resplit_small_corpus(out, name, shards, shard_tokens)
        split_tokens = {"train": writer.total - val_tokens, "val": val_tokens}
        val_split = (
            f"the corpus is smaller than one shard: validation is its first {val_tokens:,} "
            f"tokens ({100 * val_tokens / writer.total:.0f}%); --val-tokens sets it"
        )
    if split_tokens["train"] == 0:
        raise MinigptError(
            f"the corpus has only {writer.total:,} tokens and all went to the validation split; "
            f"pass a smaller --val-tokens (now {val_tokens:,}) or --shard-tokens"
        )
    manifest = {
        "name": name,
        "tokenizer": tokenizer.describe(),
        "source": source,
        "settings": settings,
        "documents": n_docs,
        "tokens": {"total": writer.total, **split_tokens},
        "shards": shards,
        **({"val_split": val_split} if val_split else {}),
        **asdict(stats),
        "seconds": round(elapsed, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_manifest(out, manifest)
    return read_manifest(out)


def prepare_corpus(
    out: str | os.PathLike,
    corpus: Corpus,
    *,
    shard_tokens: int,
    val_tokens: int | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """`prepare_dataset` of a `Corpus`: what `minigpt prepare` runs."""
    return prepare_dataset(
        out,
        corpus.name,
        corpus.source,
        corpus.documents,
        shard_tokens=shard_tokens,
        val_tokens=val_tokens,
        workers=workers,
        overwrite=overwrite,
        stats=corpus.stats,
        progress=progress,
    )


def small_corpus_val_tokens(total: int) -> int:
    """Validation tokens for a corpus of `total` tokens smaller than one shard: 10%, but at least
    one 1,024-token training window (+1 target) when the corpus has room for two."""
    return max(total // 10, min(1025, total // 2))


def _resplit_small_corpus(
    out: Path, name: str, shards: list[dict], shard_tokens: int
) -> tuple[list[dict], int]:
    """Rewrite a corpus that went wholly to the val split (it is under one shard, so this reads
    little) with a `small_corpus_val_tokens` split; returns (shards, val tokens)."""
    tokens = np.concatenate([np.asarray(read_shard(out / s["file"])) for s in shards])
    for s in shards:
        (out / s["file"]).unlink()
    val_tokens = small_corpus_val_tokens(len(tokens))
    writer = TokenShardWriter(out, name, shard_tokens=shard_tokens, val_tokens=val_tokens)
    writer.add(tokens)
    return writer.close(), val_tokens


def _check_output_dir(
    out: Path, name: str, tokenizer: Tokenizer, source: dict, settings: dict, overwrite: bool
) -> dict | None:
    """The finished manifest if there is nothing to do; otherwise clears the way or raises."""
    if out.exists() and not out.is_dir():
        raise MinigptError(f"--out {out} is a file, not a directory")
    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is not None:
        if manifest["tokenizer"] != tokenizer.describe() and not overwrite:
            raise ShardError(
                f"{out} holds shards from a different tokenizer ({manifest['tokenizer']}); "
                "use another --out, or --overwrite to replace them"
            )
        same = manifest["source"] == source and manifest.get("settings") == settings
        if same and not overwrite:
            print(f"{out}: already prepared from this source with these settings; nothing to do")
            return manifest
        if not overwrite:
            raise MinigptError(
                f"{out} already holds a dataset prepared from {manifest['source']} with "
                f"{manifest.get('settings')}; use another --out, or --overwrite to replace it"
            )
        (out / MANIFEST).unlink()  # first, so a crash mid-overwrite never looks complete
    if out.is_dir():
        _remove_unfinished(out, name, overwrite)
    return None


def _remove_unfinished(out: Path, name: str, overwrite: bool) -> None:
    """Delete shards of an interrupted (or replaced) run; refuse to touch anyone else's files."""
    leftovers = [p for p in out.iterdir() if p.suffix in (".bin", ".npy", ".tmp")]
    foreign = [p for p in leftovers if not p.name.startswith(f"{name}_") and not overwrite]
    if foreign:
        raise ShardError(
            f"{out} holds shard files that minigpt did not write for {name!r} (e.g. {foreign[0].name}); "
            "use an empty --out directory"
        )
    if leftovers and not overwrite:
        print(f"{out}: removing {len(leftovers)} shard(s) of an unfinished earlier run")
    for path in leftovers:
        path.unlink()
