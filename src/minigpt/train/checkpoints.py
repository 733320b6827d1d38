"""Training checkpoints: crash-safe writes, pruning, and finding one to resume from.

`RUN/checkpoints/step_NNNNNNN/` holds the model (`model.safetensors` + `model.json`, through
`minigpt.checkpoint.save_model`) and `training_state.pt` (optimizer, scaler, loader position,
RNG states, step), loaded only with `torch.load(weights_only=True)`. A checkpoint is written into
`.tmp-step_NNNNNNN/`, its files fsynced, then renamed into place; only then does `latest` (a text
file, itself replaced atomically) name it. A process killed mid-write leaves a `.tmp-` directory
that nothing ever resumes from. When the newest checkpoint is unreadable anyway (disk trouble, a
hand-edited file), resuming from a run directory warns and falls back to the next newest.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from minigpt.checkpoint import LATEST, WEIGHTS, CheckpointError, load_model, save_model
from minigpt.model import GPT

CHECKPOINTS = "checkpoints"
TRAINING_STATE = "training_state.pt"
STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
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
    before_rename: Callable[[], None] | None = None,
) -> Path:
    """Write the checkpoint for `step` atomically, point `latest` at it, prune old ones.

    `before_rename` runs once the files are written but not yet renamed into place (tests use it
    to kill the process at the worst moment). Returns the checkpoint directory.
    """
    checkpoints = Path(run_dir) / CHECKPOINTS
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / checkpoint_name(step)
    tmp = checkpoints / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed mid-write
    save_model(tmp, model, step=step)
    torch.save(training_state, tmp / TRAINING_STATE)
    _fsync_tree(tmp)
    if before_rename is not None:
        before_rename()
    if final.exists():  # a resumed run re-reaching a step that an earlier attempt also saved
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_latest(checkpoints, final.name)
    prune_checkpoints(checkpoints, keep_last)
    return final


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Renamed-into-place checkpoint directories, newest step first."""
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Whether a run directory holds a complete checkpoint (readable or not)."""
    return bool(complete_checkpoints(Path(run_dir) / CHECKPOINTS))


def prune_checkpoints(checkpoints: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (0 keeps everything)."""
    if keep_last > 0:
        for old in complete_checkpoints(checkpoints)[keep_last:]:
            shutil.rmtree(old)


def load_checkpoint(directory: Path) -> tuple[GPT, dict]:
    """The model and training state of one checkpoint; CheckpointError if either is unreadable."""
    model = load_model(directory)
    path = directory / TRAINING_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, missing file, unpickling refused: all mean unusable
        raise CheckpointError(f"{path}: unreadable training state ({e})") from e
    return model, state


def find_resumable(path: str | os.PathLike) -> tuple[Path, GPT, dict]:
    """The checkpoint to resume from for `path`, loaded: `(directory, model, training_state)`.

    `path` is a checkpoint directory (used as is) or a run directory: its `latest` checkpoint, or,
    when that one cannot be read, the newest older one that can (with a warning).
    """
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return (path, *load_checkpoint(path))
    checkpoints = path / CHECKPOINTS
    candidates = complete_checkpoints(checkpoints)
    latest = checkpoints / LATEST
    if latest.is_file():
        named = checkpoints / latest.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    if not candidates:
        raise CheckpointError(
            f"{path}: no checkpoints to resume from (expected {CHECKPOINTS}/step_*/ in a run "
            "directory, or a checkpoint directory with model.safetensors)"
        )
    for candidate in candidates:
        try:
            return (candidate, *load_checkpoint(candidate))
        except CheckpointError as e:
            warnings.warn(f"skipping unusable checkpoint: {e}", stacklevel=2)
    raise CheckpointError(f"{path}: every checkpoint is unreadable; cannot resume")
