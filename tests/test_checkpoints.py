"""The run directory's owner: which checkpoint a path means, `--resume` paths, staying light."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from minigpt.checkpoints import (
    CHECKSUMS,
    TRAINING_STATE,
    WEIGHTS,
    CheckpointError,
    checkpoint_candidates,
    find_resumable,
    has_checkpoint,
    load_model,
    resolve_checkpoint,
    resume_source,
    save_checkpoint,
    verify_checkpoint,
    write_checksums,
)
from minigpt.errors import MinigptError
from minigpt.model import GPT

from conftest import SRC, tiny_config


@pytest.fixture
def run(tmp_path):
    """A run with checkpoints at steps 2, 4 and 6 (keep_last 0 keeps all), `latest` naming 6;
    each step's weights differ (wte[0, 0] = step), so a test can tell which one was loaded."""
    model = GPT(tiny_config())
    for step in (2, 4, 6):
        with torch.no_grad():
            model.transformer.wte.weight[0, 0] = step
        save_checkpoint(tmp_path, step, model, {"step": step}, keep_last=0)
    return tmp_path


def loaded_step(model: GPT) -> int:
    return int(model.transformer.wte.weight[0, 0].item())


def flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def cut_short(path):
    path.write_bytes(path.read_bytes()[:-100])


DAMAGES = {"bit flip": flip_a_bit, "truncation": cut_short, "missing file": lambda p: p.unlink()}


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


def test_checksums_are_each_files_sha256_and_size_at_any_depth(run):
    step = run / "checkpoints" / "step_0000006"
    files = json.loads((step / CHECKSUMS).read_text())["files"]
    assert set(files) == {WEIGHTS, "model.json", TRAINING_STATE}
    weights = (step / WEIGHTS).read_bytes()
    assert files[WEIGHTS] == {"size": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}
    shards = step / "sharded" / "rank0"  # a subdirectory of files (a sharded optimizer, say)
    shards.mkdir(parents=True)
    (shards / "part.bin").write_bytes(b"x" * 10)
    write_checksums(step)
    assert "sharded/rank0/part.bin" in json.loads((step / CHECKSUMS).read_text())["files"]
    flip_a_bit(shards / "part.bin")
    verify_checkpoint(step)  # sizes only: a flipped bit needs the full read
    with pytest.raises(CheckpointError, match="part.bin: sha256 differs"):
        verify_checkpoint(step, full=True)


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("damaged", [WEIGHTS, TRAINING_STATE])
def test_resume_skips_a_damaged_newest_checkpoint_naming_the_file(run, damage, damaged):
    DAMAGES[damage](run / "checkpoints" / "step_0000006" / damaged)
    with pytest.warns(UserWarning, match=f"skipping unusable checkpoint: .*step_0000006/{damaged}"):
        directory, model, state = find_resumable(run)
    assert directory.name == "step_0000004" and state["step"] == 4 and loaded_step(model) == 4


@pytest.mark.parametrize("damage", DAMAGES)
def test_loading_a_run_falls_back_past_a_damaged_checkpoint(run, damage):
    newest = run / "checkpoints" / "step_0000006"
    DAMAGES[damage](newest / WEIGHTS)
    if damage == "bit flip":  # the size still matches: only --verify reads every byte
        assert loaded_step(load_model(run)) != 4
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint: .*step_0000006/{WEIGHTS}"):
        assert loaded_step(load_model(run, verify=True)) == 4
    with pytest.raises(CheckpointError, match=f"step_0000006/{WEIGHTS}"):
        load_model(newest, verify=True)  # asked for by name: no other one will do


def test_with_no_intact_checkpoint_loading_and_resuming_say_so(run):
    for step in (2, 4, 6):
        cut_short(run / "checkpoints" / f"step_000000{step}" / WEIGHTS)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="every checkpoint is"):
        load_model(run)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="every checkpoint is"):
        find_resumable(run)


def test_cli_verify_skips_a_bit_flipped_checkpoint_with_a_warning(run, cli):
    flip_a_bit(run / "checkpoints" / "step_0000006" / WEIGHTS)
    args = ["generate", "--model", run, "--prompt", "Hi", "--max-new-tokens", "2", "--seed", "0"]
    result = cli(*args, "--verify", "--device", "cpu")
    assert f"step_0000006/{WEIGHTS}: sha256 differs" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def sharded(tmp_path):
    """A sharded checkpoint as an FSDP run lays it out, written here by one process."""
    from minigpt.checkpoints import TIED_KEY

    model = GPT(tiny_config())
    weights = {k: v for k, v in model.state_dict().items() if k != TIED_KEY}
    save_checkpoint(tmp_path, 2, model, {"step": 2}, keep_last=0, shards={"model": weights})
    return tmp_path, model


def test_a_sharded_checkpoint_loads_consolidated_and_tied(sharded):
    from minigpt.checkpoints import SHARDED

    run, model = sharded
    checkpoint = run / "checkpoints" / "step_0000002"
    assert (checkpoint / SHARDED / ".metadata").is_file() and not (checkpoint / WEIGHTS).exists()
    loaded = load_model(run, verify=True)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    shard = next((checkpoint / SHARDED).glob("*.distcp"))
    flip_a_bit(shard)  # the checksums cover every shard file
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_model(checkpoint, verify=True)


def test_shard_metadata_that_would_run_code_is_refused_unrun(sharded, tmp_path):
    """The shards' index is a pickle: one naming any callable but its own classes is refused
    before anything runs (a marker file would appear if it ran)."""
    import pickle

    from minigpt.checkpoints import SHARDED

    run, _ = sharded
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    checkpoint = run / "checkpoints" / "step_0000002"
    (checkpoint / SHARDED / ".metadata").write_bytes(pickle.dumps(Exploit()))
    write_checksums(checkpoint)  # as whoever crafted it would
    with pytest.raises(CheckpointError, match="open has no place"):
        load_model(checkpoint, verify=True)
    assert not marker.exists()


def test_a_shard_write_that_fails_leaves_no_checkpoint_and_says_why(sharded, monkeypatch):
    """A full disk while the processes write their shards: the half-written checkpoint is
    removed, `latest` still names the one before, and the error names the cause."""
    import errno

    from torch.distributed.checkpoint import FileSystemWriter

    from minigpt.checkpoints import TIED_KEY
    from minigpt.errors import WriteFailed

    run, model = sharded

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", disk_full)
    weights = {k: v for k, v in model.state_dict().items() if k != TIED_KEY}
    message = "step_0000004: No space left on device.*step_0000002\\) are intact"
    with pytest.raises(WriteFailed, match=message):
        save_checkpoint(run, 4, model, {"step": 4}, keep_last=0, shards={"model": weights})
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000002"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
