"""The run directory's owner: which checkpoint a path means, `--resume` paths, staying light."""

from __future__ import annotations

import subprocess
import sys

import pytest

from minigpt.checkpoints import (
    CheckpointError,
    checkpoint_candidates,
    has_checkpoint,
    load_model,
    resolve_checkpoint,
    resume_source,
    save_checkpoint,
)
from minigpt.errors import MinigptError
from minigpt.model import GPT

from conftest import SRC, tiny_config


@pytest.fixture
def run(tmp_path):
    """A run with checkpoints at steps 2, 4 and 6 (keep_last 0 keeps all), `latest` naming 6."""
    model = GPT(tiny_config())
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep_last=0)
    return tmp_path


def test_candidates_are_the_latest_then_newest_first_and_loading_takes_the_first(run):
    steps = run / "checkpoints"
    assert checkpoint_candidates(run) == [steps / f"step_000000{s}" for s in (6, 4, 2)]
    assert checkpoint_candidates(steps) == checkpoint_candidates(run)
    assert checkpoint_candidates(steps / "step_0000002") == [steps / "step_0000002"]
    (steps / "latest").write_text("step_0000004\n")  # a crash between rename and `latest`
    assert checkpoint_candidates(run)[:2] == [steps / "step_0000004", steps / "step_0000006"]
    assert resolve_checkpoint(run) == steps / "step_0000004"
    assert isinstance(load_model(run), GPT) and has_checkpoint(run)


def test_keep_last_prunes_and_a_run_without_checkpoints_is_refused(run, tmp_path_factory):
    save_checkpoint(run, 8, GPT(tiny_config()), {"step": 8}, keep_last=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest", "step_0000006", "step_0000008",
    ]  # fmt: skip
    empty = tmp_path_factory.mktemp("empty")
    assert checkpoint_candidates(empty) == [] and not has_checkpoint(empty)
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        resolve_checkpoint(empty)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        resolve_checkpoint(empty / "missing")


def test_resume_source_maps_latest_runs_and_checkpoints_to_their_run(run, tmp_path_factory):
    step = run / "checkpoints" / "step_0000004"
    other = tmp_path_factory.mktemp("other")
    assert resume_source("latest", run) == (run, run)
    assert resume_source(str(run), None) == (run, run)
    assert resume_source(str(step), None) == (step, run)
    assert resume_source(str(step), other) == (step, other)
    with pytest.raises(MinigptError, match="needs --out"):
        resume_source("latest", None)
    with pytest.raises(MinigptError, match="no such run or checkpoint"):
        resume_source(str(run / "missing"), None)


def test_importing_it_imports_no_training_code():
    code = (
        "import sys, minigpt.checkpoints\n"
        "train = [m for m in sys.modules if m.startswith(('minigpt.train', 'minigpt.data'))]\n"
        "assert not train, train\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC)}
    )
    assert result.returncode == 0, result.stderr
