"""Model checkpoints on disk: the weights-and-shape part every consumer of a trained model reads.

Layout of one checkpoint directory (what `minigpt train` writes as `RUN/checkpoints/step_NNNNNNN/`):
    model.safetensors   the state dict, tied head stored once (as `transformer.wte.weight`)
    model.json          {"config": GPTConfig fields, "step": int, ...}
Training state (optimizer, loader, RNG) lives beside these files and belongs to the trainer; the
engine, evals and exporter read only the two files above and never import training code.
`load_model` also accepts a Hugging Face GPT-2 directory, so every consumer of a model can start
from OpenAI's weights.
A run directory points at its newest complete checkpoint through `RUN/checkpoints/latest`, a text
file naming it. Loading never executes code from the files (safetensors, JSON).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minigpt.errors import MinigptError
from minigpt.interop import hf
from minigpt.model import GPT, GPTConfig, state_dict_mismatch, weights_left_uninitialized

WEIGHTS = "model.safetensors"
META = "model.json"
LATEST = "latest"
TIED_KEY = "lm_head.weight"  # shares storage with transformer.wte.weight


class CheckpointError(MinigptError, ValueError):
    """A path that is not a usable model checkpoint."""


def save_model(directory: str | os.PathLike, model: GPT, **meta) -> None:
    """Write weights and config into `directory` (which the caller renames into place)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state.pop(TIED_KEY)
    save_file(state, str(directory / WEIGHTS))
    (directory / META).write_text(json.dumps({"config": model.config.to_dict(), **meta}, indent=2))


def read_meta(directory: str | os.PathLike) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {META}; not a minigpt checkpoint directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt ({e})") from e


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> GPT:
    """A GPT from a checkpoint directory, a run directory (its latest checkpoint), or a
    transformers GPT-2 directory (config.json + weights, imported by `minigpt.interop.hf`)."""
    if hf.is_hf_directory(path):
        return hf.from_pretrained(path, device=device, dtype=dtype)
    directory = resolve_checkpoint(path)
    meta = read_meta(directory)
    config = GPTConfig.from_dict(meta["config"])
    with weights_left_uninitialized():  # every weight comes from the file
        model = GPT(config)
    try:
        state = load_file(str(directory / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"{directory / WEIGHTS}: unreadable weights ({e})") from e
    state[TIED_KEY] = state["transformer.wte.weight"]
    mismatch = state_dict_mismatch(state, model.state_dict())
    if mismatch:
        raise CheckpointError(f"{directory}: weights do not match its config {config}: {mismatch}")
    model.load_state_dict(state, assign=True)  # take the loaded tensors: no second copy
    model.lm_head.weight = model.transformer.wte.weight  # assign replaced both: tie again
    return model.to(device=device, dtype=dtype)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory for `path`: itself, or a run directory's latest checkpoint."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    for candidate in (path / LATEST, path / "checkpoints" / LATEST):
        if candidate.is_file():
            return candidate.parent / candidate.read_text().strip()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    raise CheckpointError(
        f"{path}: neither a checkpoint directory (with {WEIGHTS}) nor a run directory "
        f"(with checkpoints/{LATEST})"
    )
