"""The token shard format: what `prepare` writes and the training loader streams.

A shard is the llm.c / modded-nanogpt `.bin` layout: a header of 256 little-endian int32
(`[0]` = 20240520 magic, `[1]` = 1 version, `[2]` = number of tokens), then the tokens as
little-endian uint16. build-nanogpt's `.npy` shards (a 1-D uint16 array) are read too.
A dataset directory holds `{name}_{split}_{index:06d}.bin` shards and a `manifest.json` written
last, once every shard is complete; shard files are written under a temporary name and renamed, so
a crash never leaves a half-written shard that looks whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from minigpt.errors import MinigptError, write_failed

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "minigpt-shards/1"


class ShardError(MinigptError, ValueError):
    """A shard or dataset directory that cannot be read as what it claims to be."""


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write `tokens` (ids < 65,536) as a `.bin` shard, atomically."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"shard tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(TOKEN_DTYPE).max):
        raise ValueError("token ids must fit in uint16 (0..65535) for the .bin shard format")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(TOKEN_DTYPE, copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full or failing disk: no partial shard stays behind
        tmp.unlink(missing_ok=True)
        raise write_failed(
            path, e, "the dataset has no manifest, so nothing reads it: free space, rerun prepare"
        ) from e
    os.replace(tmp, path)


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a `.bin` (validated header) or build-nanogpt `.npy` shard as uint16 tokens."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: no such shard file")
    if path.suffix == ".npy":
        return _read_npy_shard(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(
            f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header "
            "(truncated or not a shard); re-run `minigpt prepare` for this dataset"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(
            f"{path}: bad magic number {header[0]} (expected {MAGIC}); this is not a "
            "llm.c/minigpt token shard"
        )
    if header[1] != VERSION:
        raise ShardError(
            f"{path}: shard version {header[1]} is not supported (this reader knows {VERSION})"
        )
    n_tokens = int(header[2])
    expected = HEADER_BYTES + n_tokens * TOKEN_DTYPE.itemsize
    if size != expected:
        raise ShardError(
            f"{path}: header says {n_tokens:,} tokens ({expected:,} bytes) but the file has "
            f"{size:,} bytes (truncated or corrupt); re-run `minigpt prepare` for this dataset"
        )
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def _read_npy_shard(path: Path) -> np.ndarray:
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ShardError(f"{path}: not a readable .npy token shard ({e})") from e
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ShardError(f"{path}: expected a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    return tokens


def shard_name(name: str, split: str, index: int) -> str:
    return f"{name}_{split}_{index:06d}.bin"


def list_shards(directory: str | os.PathLike, split: str) -> list[Path]:
    """Shards of one split in a dataset directory, in order. Uses the manifest when present;
    otherwise any `*_{split}_*.bin` / `.npy` (build-nanogpt names its splits the same way)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ShardError(f"{directory}: no such dataset directory; run `minigpt prepare` first")
    manifest = read_manifest(directory)
    if manifest is not None:
        paths = [directory / s["file"] for s in manifest["shards"] if s["split"] == split]
    else:
        paths = sorted(
            p
            for p in directory.iterdir()
            if p.suffix in (".bin", ".npy") and f"_{split}_" in p.name
        )
    if not paths:
        val = " (and --val-tokens of at least 1)" if split == "val" else ""
        raise ShardError(
            f"{directory}: no {split!r} shards found; prepare the dataset again with "
            f"`minigpt prepare ... --overwrite`{val}"
        )
    return paths


def read_manifest(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e}); delete it and re-run prepare") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ShardError(f"{path}: unknown manifest format {manifest.get('format')!r}")
    return manifest


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """Write the manifest atomically; its presence marks the dataset as complete."""
    path = Path(directory) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    try:
        tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, **manifest}, indent=2) + "\n")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failed(
            path, e, "the shards are whole but unmarked: free space, rerun prepare"
        ) from e
    os.replace(tmp, path)


class TokenShardWriter:
    """Streams documents' tokens into fixed-size shards, holding at most one shard in memory.

    The first `val_tokens` tokens form the validation split (one or more val shards); everything
    after goes to train shards. Documents may straddle shard boundaries, as in build-nanogpt.
    """

    def __init__(self, directory: str | os.PathLike, name: str, shard_tokens: int, val_tokens: int):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.directory = Path(directory)
        self.name = name
        self.shard_tokens = shard_tokens
        self.val_tokens = val_tokens
        self.buffer = np.empty(shard_tokens, dtype=TOKEN_DTYPE)
        self.filled = 0
        self.total = 0  # tokens accepted so far, both splits
        self.shards: list[dict] = []
        self._split_index = {"val": 0, "train": 0}

    def _current_split(self) -> str:
        return "val" if self.total < self.val_tokens else "train"

    def _capacity(self) -> int:
        """Room in the current shard, cut short where the val split ends."""
        room = self.shard_tokens - self.filled
        if self.total < self.val_tokens:
            room = min(room, self.val_tokens - self.total)
        return room

    def add(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=TOKEN_DTYPE)
        start = 0
        while start < tokens.size:
            split = self._current_split()
            take = min(self._capacity(), tokens.size - start)
            self.buffer[self.filled : self.filled + take] = tokens[start : start + take]
            self.filled += take
            self.total += take
            start += take
            if self.filled == self.shard_tokens or split != self._current_split():
                self._flush(split)

    def _flush(self, split: str) -> None:
        if self.filled == 0:
            return
        index = self._split_index[split]
        file = shard_name(self.name, split, index)
        write_shard(self.directory / file, self.buffer[: self.filled])
        self.shards.append({"file": file, "split": split, "tokens": int(self.filled)})
        self._split_index[split] = index + 1
        self.filled = 0

    def close(self) -> list[dict]:
        """Write the last partial shard; returns the shard list for the manifest."""
        self._flush(self._current_split())
        return self.shards


def _as_batch(windows: np.ndarray):
    """(B, T+1) token windows -> (inputs, targets) int64 tensors, shifted by one."""
    import torch  # imported here so `minigpt prepare` runs without loading torch

    tokens = torch.from_numpy(windows.astype(np.int64))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class TokenLoader:
    """Training batches from a split's shards: a seeded, resumable stream of token windows.

    Every epoch visits the shards in a fresh seeded order; inside a shard, windows of
    `seq_len + 1` tokens start at a seeded offset and come in a seeded order, so small corpora
    trained for many epochs do not see the same sequences twice. The stream is a function of
    (seed, epoch, position) alone: `state_dict()` is three integers, and a loader restored from it
    yields exactly the batches the original would have.

    Under data parallelism every rank runs the same stream: each call to `next_batch` consumes
    `world_size * micro_batch` windows and rank r keeps the r-th slice, so ranks read disjoint data
    and N ranks together see what one process with N times the accumulation steps would.

    The current shard is read into memory whole, in one sequential pass, when the stream
    reaches it: random windows from a memory map would fault its pages in one by one.
    """

    ignores_targets = False  # every target is a real next token

    def __init__(
        self,
        directory: str | os.PathLike,
        split: str,
        micro_batch: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        paths = list_shards(directory, split)
        self.shards = [s for s in map(read_shard, paths) if len(s) > seq_len]
        if not self.shards:
            raise ShardError(
                f"{directory}: every {split!r} shard is shorter than one window of "
                f"{seq_len + 1} tokens; use a shorter sequence length or more data"
            )
        self.micro_batch, self.seq_len, self.seed = micro_batch, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = self.shard_pos = self.window_pos = 0
        self._shard_index: int | None = None  # which shard `_shard` holds
        self._plan()

    def _plan(self) -> None:
        """Shard order for this epoch and window starts for the current shard."""
        self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        index = int(self._order[self.shard_pos])
        n = len(self.shards[index])
        rng = np.random.default_rng([self.seed, self.epoch, index])
        offset = int(rng.integers(0, min(self.seq_len, n - self.seq_len - 1) + 1))
        count = (n - offset - 1) // self.seq_len
        self._starts = offset + self.seq_len * rng.permutation(count)
        if index != self._shard_index:
            self._shard, self._shard_index = np.array(self.shards[index]), index

    def _advance(self) -> None:
        self.window_pos += 1
        if self.window_pos == len(self._starts):
            self.window_pos = 0
            self.shard_pos += 1
            if self.shard_pos == len(self.shards):
                self.shard_pos = 0
                self.epoch += 1
            self._plan()

    def next_batch(self):
        """(inputs, targets): int64 tensors of shape (micro_batch, seq_len) for this rank."""
        windows = np.empty((self.micro_batch, self.seq_len + 1), dtype=TOKEN_DTYPE)
        first = self.rank * self.micro_batch
        for i in range(self.world_size * self.micro_batch):
            if first <= i < first + self.micro_batch:
                start = int(self._starts[self.window_pos])
                windows[i - first] = self._shard[start : start + self.seq_len + 1]
            self._advance()
        return _as_batch(windows)

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "window_pos": self.window_pos,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ShardError(
                f"loader state was saved with seed {state['seed']}, this run uses {self.seed}; "
                "resume with the run's original train.seed"
            )
        self.epoch, self.shard_pos = state["epoch"], state["shard_pos"]
        self._plan()
        if state["window_pos"] >= len(self._starts):
            raise ShardError(
                "loader state does not fit this dataset (its shards changed since the "
                "checkpoint was written); resume on the same data"
            )
        self.window_pos = state["window_pos"]


def _leading_tokens(paths: list[Path], n: int) -> np.ndarray:
    """The first `n` tokens of the shards at `paths` taken in order (fewer if they run out)."""
    parts, have = [], 0
    for path in paths:
        part = read_shard(path)[: n - have]
        parts.append(np.asarray(part))
        have += len(part)
        if have == n:
            break
    return np.concatenate(parts)


class ValidationSet:
    """A fixed validation set: the first `max_tokens` tokens of the val split, cut into windows.

    The same tokens in the same order every time, so validation losses compare across steps and
    across runs with the same sequence length. Rank r of `world_size` evaluates windows
    r, r + world_size, ...; summing the per-rank loss totals gives the full-set loss.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        seq_len: int,
        max_tokens: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        tokens = _leading_tokens(list_shards(directory, "val"), max_tokens + 1)
        count = min(max_tokens, len(tokens) - 1) // seq_len
        if count == 0:
            raise ShardError(
                f"{directory}: the val split has {len(tokens):,} tokens, fewer than one "
                f"window of {seq_len + 1}; prepare more validation tokens"
            )
        starts = np.arange(count) * seq_len
        windows = [tokens[s : s + seq_len + 1] for s in starts[rank::world_size]]
        self.windows = np.asarray(windows, dtype=TOKEN_DTYPE).reshape(-1, seq_len + 1)
        self.micro_batch = micro_batch
        self.num_tokens = count * seq_len  # over all ranks

    def batches(self):
        """Yields (inputs, targets) int64 tensors of at most micro_batch rows, always the same."""
        for i in range(0, len(self.windows), self.micro_batch):
            yield _as_batch(self.windows[i : i + self.micro_batch])
