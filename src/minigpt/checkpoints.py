"""The run directory and its checkpoints: the layout, crash-safe writes, which checkpoint a path
means, and loading a model from a run, a checkpoint or a Hugging Face GPT-2 directory.

Layout of a run directory (what `minigpt train`, `sft` and `dpo` write):
    RUN/checkpoints/step_NNNNNNN/   one checkpoint:
        model.safetensors           the state dict, tied head stored once (as `transformer.wte.weight`)
        model.json                  {"config": GPTConfig fields, "step": int, "head": ...}
        training_state.pt           optimizer, scaler, loader position, RNG states, step
        checksums.json              size and sha256 of every other file in it, at any depth
    or, written by a sharded (FSDP) run, in place of model.safetensors:
        sharded/                    the weights (tied head once) and AdamW's state, one file per
                                    process (torch.distributed.checkpoint); training_state.pt
                                    then holds the optimizer's param groups, not its state
    RUN/checkpoints/latest          a text file naming the newest complete checkpoint
The engine, evals and exporters read only the model files (a sharded checkpoint is consolidated
on load, in one process, whatever number of processes wrote it); this module imports no training
code, so they stay light. Loading never executes code from the files (safetensors, JSON,
`torch.load(weights_only=True)`, shards read as tensors only, their metadata unpickled with an
allow-list).

A checkpoint is written into `.tmp-step_NNNNNNN/`, its checksums last, its files fsynced, then
renamed into place; only then does `latest` (itself replaced atomically) name it. A process killed
mid-write leaves a `.tmp-` directory that nothing ever reads. `checkpoint_candidates` alone
decides which checkpoint a path means, newest first; a checkpoint damaged after it was written (a
bad disk, a copy cut short) fails `verify_checkpoint` (sizes always, sha256 when resuming or asked
to), and a run directory then falls back to the next newest intact one, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minigpt.errors import MinigptError, write_failed
from minigpt.interop import hf
from minigpt.model import GPT, GPTConfig, state_dict_mismatch, weights_left_uninitialized
from minigpt.reward import REWARD_HEAD, RewardModel

CHECKPOINTS = "checkpoints"  # RUN/checkpoints/
LATEST = "latest"  # RUN/checkpoints/latest
ABANDONED = "abandoned"  # RUN/checkpoints/abandoned/: past the step a run was resumed from
WEIGHTS = "model.safetensors"
META = "model.json"
TRAINING_STATE = "training_state.pt"
SHARDED = "sharded"  # step_N/sharded/: torch.distributed.checkpoint files, one per process
CHECKSUMS = "checksums.json"  # {"files": {relative path: {"size": bytes, "sha256": hex}}}
TIED_KEY = "lm_head.weight"  # shares storage with transformer.wte.weight
LM_HEAD = "lm"  # model.json "head" of a language model (files without the key are one)
_STEP_NAME = re.compile(r"^step_(\d+)$")


class CheckpointError(MinigptError, ValueError):
    """A path that is not a usable model checkpoint."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def is_sharded(directory: str | os.PathLike) -> bool:
    """Whether a checkpoint directory holds sharded weights (written under FSDP)."""
    return (Path(directory) / SHARDED).is_dir() and not (Path(directory) / WEIGHTS).is_file()


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is one checkpoint directory (rather than a run directory), whole or not."""
    return any((Path(path) / name).is_file() for name in (WEIGHTS, CHECKSUMS))


# ---------------------------------------------------------------------------------- run paths
def default_run_dir(config_path: str | os.PathLike) -> Path:
    return Path("runs") / f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def resume_source(resume: str, out: str | os.PathLike | None) -> tuple[Path, Path]:
    """(what to resume from, the run directory to continue in) for `--resume latest|PATH`."""
    if resume == "latest":
        if out is None:
            raise MinigptError("--resume latest needs --out RUN (the run to continue)")
        return Path(out), Path(out)
    path = Path(resume)
    if not path.exists():
        raise MinigptError(f"--resume {resume}: no such run or checkpoint directory")
    if is_checkpoint(path):  # RUN/checkpoints/step_N continues RUN
        return path, Path(out) if out is not None else path.parent.parent
    return path, Path(out) if out is not None else path


# ---------------------------------------------------------------------------------- writing
def save_model(directory: str | os.PathLike, model: GPT, **meta) -> None:
    """Write weights and config into `directory` (not atomic: `save_checkpoint` renames it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state.pop(TIED_KEY)
    save_file(state, str(directory / WEIGHTS))
    write_meta(directory, model, **meta)


def write_meta(directory: Path, model: GPT, **meta) -> None:
    """model.json: the model's config and head kind, and `meta` (the step)."""
    head = getattr(model, "head", LM_HEAD)
    meta = {"config": model.config.to_dict(), "head": head, **meta}
    (directory / META).write_text(json.dumps(meta, indent=2))


def _files(directory: Path) -> list[Path]:
    """Every file under `directory`, at any depth, but the checksums themselves."""
    found = (p for p in directory.rglob("*") if p.is_file())
    return sorted(p for p in found if p.relative_to(directory).as_posix() != CHECKSUMS)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory: str | os.PathLike) -> None:
    """Record the size and sha256 of every file in `directory`; written last, via a rename, so a
    checkpoint either has whole checksums or none."""
    directory = Path(directory)
    files = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(directory)
    }
    tmp = directory / f".{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, directory / CHECKSUMS)


def _fsync_tree(directory: Path) -> None:
    for path in [*_files(directory), directory / CHECKSUMS]:
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _write_latest(checkpoints: Path, name: str) -> None:
    tmp = checkpoints / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, checkpoints / LATEST)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: GPT,
    training_state: dict,
    keep_last: int,
    shards: dict | None = None,
    main: bool = True,
) -> Path:
    """Write the checkpoint for `step` atomically, point `latest` at it, and delete all but the
    newest `keep_last` checkpoints (0 keeps every one). Returns the checkpoint directory.

    With `shards` (nested dicts of DTensors, as `minigpt.train.parallel.sharded_state` gives
    them) every process calls this: they write `sharded/` together, then the `main` one alone
    writes the rest, checksums every process's file and renames the checkpoint into place."""
    checkpoints = Path(run_dir) / CHECKPOINTS
    final = checkpoints / checkpoint_name(step)
    tmp = checkpoints / f".tmp-{final.name}"
    if main:
        checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed mid-write
    try:
        if shards is not None:
            _write_shards(tmp / SHARDED, shards)
        if main:
            if shards is None:
                save_model(tmp, model, step=step)
            else:
                write_meta(tmp, model, step=step)
            with open(tmp / TRAINING_STATE, "wb") as f:  # a file of ours: its OSError says why
                torch.save(training_state, f)
            write_checksums(tmp)
            _fsync_tree(tmp)
    except (OSError, RuntimeError, SafetensorError) as e:  # a full or failing disk
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; nothing reads it
        kept = _complete_checkpoints(checkpoints)
        then = (
            f"the checkpoints before it ({', '.join(p.name for p in kept)}) are intact: free "
            "space, then continue with --resume latest"
            if kept
            else "no checkpoint was written before it: free space and start again"
        )
        raise write_failed(final, e, then) from e
    if not main:
        return final
    if final.exists():  # a resumed run re-reaching a step that an earlier attempt also saved
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_latest(checkpoints, final.name)
    if keep_last > 0:
        for old in _complete_checkpoints(checkpoints)[keep_last:]:
            shutil.rmtree(old)
    return final


def _write_shards(directory: Path, shards: dict) -> None:
    """Every process writes its own shard file into `directory` (once the main one has cleared
    what a killed run left there); any process's failure is raised on every process, as a
    RuntimeError caused by that process's error (an OSError says why)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemWriter, save
    from torch.distributed.checkpoint.api import CheckpointException

    if dist.is_initialized():
        dist.barrier()
    try:
        with warnings.catch_warnings():  # without a process group: one process, as meant
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            save(shards, storage_writer=FileSystemWriter(directory))
    except CheckpointException as e:  # a BaseException: made an ordinary error here
        rank, (error, _) = next(iter(e.failures.items()))
        raise RuntimeError(f"process {rank} could not write its shard: {error}") from error


# the classes a torch.distributed.checkpoint .metadata pickle is made of: nothing else is loaded
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by its name
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "WindowsPath"},  # where the shards were written
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """The shards' index (a pickle, as torch writes it) read without running code: only the
    index's own data classes and torch's dtypes, layouts and memory formats."""

    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype | torch.layout | torch.memory_format):
                return value
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's metadata")


def read_shards(directory: str | os.PathLike, state: dict) -> None:
    """Fill `state` (nested dicts of tensors, plain or DTensor, as written) in place from the
    shards in `directory`, on one process or on every process of a sharded run, whatever number
    of processes wrote them; keys the shards hold and `state` lacks are not read. Only tensors
    are read (a shard entry of pickled bytes is refused), so no code runs."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(Path(self.path) / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class TensorsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            raise CheckpointError(f"{directory}: {read_item.dest_index.fqn} is not a tensor")

    try:
        with warnings.catch_warnings():  # that one process reads everything is the intent
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            reader, planner = Reader(directory), TensorsOnly()
            load(state, storage_reader=reader, planner=planner, no_dist=not dist.is_initialized())
    except CheckpointException as e:  # a BaseException, wrapping each process's error
        _, (error, _) = next(iter(e.failures.items()))
        raise CheckpointError(f"{directory}: unreadable shards ({error})") from error
    except (OSError, pickle.UnpicklingError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{directory}: unreadable shards ({e})") from e


def set_aside_future(run_dir: str | os.PathLike, step: int) -> list[Path]:
    """Move the run's checkpoints past `step` into checkpoints/abandoned/: resuming from an
    older checkpoint abandons them, and `keep_last` and every "newest" lookup must see only the
    live branch. `latest` then names the newest checkpoint left. Returns where they went."""
    checkpoints = Path(run_dir) / CHECKPOINTS
    future = [p for p in _complete_checkpoints(checkpoints) if _step_of(p) > step]
    if not future:
        return []
    abandoned = checkpoints / ABANDONED
    abandoned.mkdir(exist_ok=True)
    moved = []
    for path in future:
        target = abandoned / path.name
        shutil.rmtree(target, ignore_errors=True)  # from an earlier resume to an older step
        os.replace(path, target)
        moved.append(target)
    left = _complete_checkpoints(checkpoints)
    if left:
        _write_latest(checkpoints, left[0].name)
    else:
        (checkpoints / LATEST).unlink(missing_ok=True)
    return moved


# ---------------------------------------------------------------------------------- finding
def _step_of(checkpoint: Path) -> int:
    return int(_STEP_NAME.match(checkpoint.name).group(1))


def _complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Renamed-into-place checkpoint directories, newest step first."""
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if (m := _STEP_NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Whether a run directory holds a complete checkpoint (readable or not)."""
    return bool(_complete_checkpoints(Path(run_dir) / CHECKPOINTS))


def checkpoint_candidates(path: str | os.PathLike) -> list[Path]:
    """The checkpoints `path` means, the one to use first: a checkpoint directory itself; for a
    run directory (or its checkpoints/), the one `latest` names, then every other complete one,
    newest step first. Empty when there is none."""
    path = Path(path)
    if is_checkpoint(path):
        return [path]
    checkpoints = path if (path / LATEST).is_file() else path / CHECKPOINTS
    found = _complete_checkpoints(checkpoints)
    latest = checkpoints / LATEST
    if latest.is_file():
        named = checkpoints / latest.read_text().strip()
        found = [named] + [c for c in found if c != named]
    return found


def chat_tuned(path: str | os.PathLike) -> bool | None:
    """Whether the model at `path` (a run directory or one of its checkpoints) was fine-tuned
    for chat by `sft` or `dpo`: its run's config.toml names conversations or preference pairs in
    `data.source`, which only fine-tuning reads. None when no run config says (a bare checkpoint,
    a Hugging Face directory)."""
    from minigpt.config import load_config

    path = Path(path)
    runs = [path, path.parent.parent] if path.parent.name == CHECKPOINTS else [path]
    for run_dir in runs:
        if (run_dir / "config.toml").is_file():
            return bool(load_config(run_dir / "config.toml").data.source)
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory `path` means: itself, or a run directory's latest checkpoint."""
    candidates = checkpoint_candidates(path)
    if candidates:
        return candidates[0]
    if not Path(path).exists():
        raise CheckpointError(f"{path}: no such file or directory")
    raise CheckpointError(
        f"{path}: neither a checkpoint directory (with {WEIGHTS}) nor a run directory "
        f"(with {CHECKPOINTS}/{LATEST})"
    )


# ---------------------------------------------------------------------------------- verifying
def verify_checkpoint(directory: str | os.PathLike, full: bool = False) -> None:
    """CheckpointError naming the first file of `directory` that is missing, of the wrong size
    or (with `full`: every byte read) of the wrong sha256. A checkpoint written before checksums
    were recorded has nothing to check against and passes."""
    directory = Path(directory)
    path = directory / CHECKSUMS
    if not path.is_file():
        return
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupt ({e})") from e
    for name, want in files.items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the checkpoint lists it)")
        size = file.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{file}: {size} bytes, {want['size']} written (cut short?)")
        if full and _sha256(file) != want["sha256"]:
            raise CheckpointError(f"{file}: sha256 differs from the one written (damaged)")


def newest_intact(path: str | os.PathLike, full: bool = False) -> Path:
    """The first checkpoint `path` means (`checkpoint_candidates`) that passes
    `verify_checkpoint`; each damaged one before it is skipped with a warning naming its file.
    A checkpoint directory asked for by name is never skipped: its damage raises."""
    path = Path(path)
    candidates = checkpoint_candidates(path)
    for candidate in candidates:
        try:
            verify_checkpoint(candidate, full)
            return candidate
        except CheckpointError as e:
            if candidate == path:
                raise
            warnings.warn(f"skipping damaged checkpoint: {e}", stacklevel=2)
    if candidates:
        raise CheckpointError(f"{path}: every checkpoint is damaged (see the warnings above)")
    return resolve_checkpoint(path)  # raises: says what the path is not


# ---------------------------------------------------------------------------------- loading
def read_meta(directory: str | os.PathLike) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {META}; not a minigpt checkpoint directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt ({e})") from e


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = False,
    head: str | None = LM_HEAD,
) -> GPT:
    """A GPT from a checkpoint directory, a run directory (its newest intact checkpoint), or a
    transformers GPT-2 directory (config.json + weights, imported by `minigpt.interop.hf`).
    Sizes are checked against the checkpoint's checksums always, the sha256 with `verify`.
    `head`: the kind of model wanted, "lm" (a language model) or "reward" (a `RewardModel`,
    from `minigpt rm`); None takes whichever the checkpoint holds."""
    if hf.is_hf_directory(path):
        if head == REWARD_HEAD:
            raise CheckpointError(f"{path}: a transformers GPT-2, not a reward model (minigpt rm)")
        return hf.from_pretrained(path, device=device, dtype=dtype)
    return _load_verified(newest_intact(path, verify), device, dtype, head)


def _load_verified(
    directory: Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    head: str | None = LM_HEAD,
) -> GPT:
    meta = read_meta(directory)
    config = GPTConfig.from_dict(meta["config"])
    stored = meta.get("head", LM_HEAD)
    if head is not None and stored != head:
        wanted = {LM_HEAD: "a language model", REWARD_HEAD: "a reward model (minigpt rm)"}
        raise CheckpointError(
            f"{directory}: {wanted.get(stored, stored)}, where {wanted.get(head, head)} is needed"
        )
    with weights_left_uninitialized():  # every weight comes from the file
        model = RewardModel(config) if stored == REWARD_HEAD else GPT(config)
    state = _consolidated(directory, model) if is_sharded(directory) else _read_weights(directory)
    state[TIED_KEY] = state["transformer.wte.weight"]
    mismatch = state_dict_mismatch(state, model.state_dict())
    if mismatch:
        raise CheckpointError(f"{directory}: weights do not match its config {config}: {mismatch}")
    model.load_state_dict(state, assign=True)  # take the loaded tensors: no second copy
    model.lm_head.weight = model.transformer.wte.weight  # assign replaced both: tie again
    return model.to(device=device, dtype=dtype)


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(directory / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"{directory / WEIGHTS}: unreadable weights ({e})") from e


def _consolidated(directory: Path, model: GPT) -> dict[str, torch.Tensor]:
    """A sharded checkpoint's weights as one state dict, read into `model`'s own tensors."""
    state = {k: v for k, v in model.state_dict().items() if k != TIED_KEY}
    read_shards(directory / SHARDED, {"model": state})
    return state


def load_checkpoint(
    directory: str | os.PathLike, consolidate: bool = True
) -> tuple[GPT | None, dict]:
    """The model and training state of one checkpoint, its sha256 checked; CheckpointError if
    either is damaged or unreadable. A sharded checkpoint's model is None unless `consolidate`
    (a sharded run reads its shards itself, never the whole model)."""
    verify_checkpoint(directory, full=True)
    model = None
    if consolidate or not is_sharded(directory):
        model = _load_verified(Path(directory), head=None)
    path = Path(directory) / TRAINING_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, missing file, unpickling refused: all mean unusable
        raise CheckpointError(f"{path}: unreadable training state ({e})") from e
    return model, state


def find_resumable(
    path: str | os.PathLike, consolidate: bool = True
) -> tuple[Path, GPT | None, dict]:
    """The checkpoint to resume from for `path`, loaded: `(directory, model, training_state)`
    (`consolidate` as `load_checkpoint` takes it).

    `path` is a checkpoint directory (used as is) or a run directory: its `latest` checkpoint, or,
    when that one is damaged (checksums, sha256 included) or cannot be read, the newest older one
    that is whole (with a warning naming the bad file).
    """
    path = Path(path)
    candidates = checkpoint_candidates(path)
    if not candidates:
        raise CheckpointError(
            f"{path}: no checkpoints to resume from (expected {CHECKPOINTS}/step_*/ in a run "
            f"directory, or a checkpoint directory with {WEIGHTS})"
        )
    for candidate in candidates:
        try:
            return (candidate, *load_checkpoint(candidate, consolidate))
        except CheckpointError as e:
            if candidate == path:  # a checkpoint asked for by name: no other one will do
                raise
            warnings.warn(f"skipping unusable checkpoint: {e}", stacklevel=2)
    raise CheckpointError(f"{path}: every checkpoint is damaged or unreadable; cannot resume")
