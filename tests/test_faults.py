"""Nothing lost under faults: a training run SIGKILLed at seeded random moments (inside
checkpoint writing too) ends bit-identical to one never stopped, and a disk that fills up or
fails mid-write leaves every earlier checkpoint intact and stops with one line naming the file."""

from __future__ import annotations

import errno
import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from minigpt import checkpoints
from minigpt.checkpoints import LATEST, find_resumable, save_checkpoint
from minigpt.errors import WriteFailed
from minigpt.model import GPT
from tests.test_train import DEMO, ONE_THREAD, TINY, assert_same_run

from conftest import run_minigpt, tiny_config, write_shakespeare_shards

# 16 steps, a checkpoint every 2: each restart redoes at most 2 steps; no tensorboard, no
# evaluation until the end, so a process is mostly its start-up
DRILL = [*TINY, "--train.max_steps=16", "--train.checkpoint_every=2", "--train.eval_every=100",
         "--log.tensorboard=false"]  # fmt: skip
# two chains side by side, 10 kills each at event 1..24 of a process (a step starting, or a
# checkpoint-writing call going in or out: see tests/faulty_minigpt.py)
DRILLS = {seed: f"drill:{seed}:10:24" for seed in (0, 1)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shakespeare_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def baseline(shards, tmp_path_factory):
    """The drill's run, never stopped."""
    run = tmp_path_factory.mktemp("runs") / "baseline"
    drill_train(run, shards, resume=False)
    return run


@pytest.fixture
def tiny_disk(tmp_path):
    """A tmpfs of a given size at a fresh directory: a disk that really fills up (ENOSPC).
    `resize(size)` gives it more room later. Needs root (CI and these machines run as root)."""
    mounted = []

    def mount(size: str) -> Path:
        path = tmp_path / "disk"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", mounted[0]], check=True)

    mount.resize = resize
    yield mount
    for path in mounted:
        subprocess.run(["umount", path], check=True)


def drill_train(run, shards, fault=None, resume=True):
    args = ["train", DEMO, *DRILL, "--out", run, f"--data.dir={shards}"]
    resume_args = ["--resume", "latest"] if resume else []
    return run_minigpt(*args, *resume_args, fault=fault, env=ONE_THREAD)


def test_twenty_sigkills_at_random_moments_then_resumes_end_bit_identical(
    baseline, shards, tmp_path
):
    with ThreadPoolExecutor(2) as pool:  # OMP_NUM_THREADS=1 each: the chains share the cores
        chains = [
            pool.submit(drill_train, tmp_path / f"chain{seed}", shards, fault)
            for seed, fault in DRILLS.items()
        ]
        killed_at = [re.search(r"killed at events (\[.*\])", c.result().stdout)[1] for c in chains]
    assert sum(len(json.loads(events)) for events in killed_at) == 20
    for seed in DRILLS:
        run = tmp_path / f"chain{seed}"
        assert_same_run(run, baseline)
        assert (run / "checkpoints" / LATEST).read_text().strip() == "step_0000016"
        assert not list((run / "checkpoints").glob(".tmp-*"))  # half-written ones cleared


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[-1]


def test_a_full_disk_stops_training_in_one_line_and_the_resume_is_exact(
    baseline, shards, tiny_disk
):
    """45 MB hold two checkpoints (~20 MB each) and not a third: the run stops at step 6's,
    naming it and the cause, leaves 2 and 4 whole, and once there is room resumes exactly."""
    run = tiny_disk("45m") / "run"
    args = ["train", DEMO, *DRILL, "--out", run, f"--data.dir={shards}"]
    full = run_minigpt(*args, check=False, env=ONE_THREAD)
    line = one_error_line(full)
    assert f"cannot write {run}/checkpoints/step_0000006: No space left on device" in line
    assert "(step_0000004, step_0000002) are intact" in line and "--resume latest" in line
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step_0000002", "step_0000004"]  # no half-written one
    assert find_resumable(run)[0].name == "step_0000004"  # every byte as written
    tiny_disk.resize("200m")
    run_minigpt(*args, "--resume", "latest", env=ONE_THREAD)
    assert_same_run(run, baseline)


def test_a_failing_disk_mid_checkpoint_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    """EIO from a write inside the checkpoint (injected): the half-written one is removed."""
    model = GPT(tiny_config())
    save_checkpoint(tmp_path, 2, model, {"step": 2}, keep_last=2)

    def failing_write(directory):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoints, "write_checksums", failing_write)
    with pytest.raises(WriteFailed, match="step_0000004: Input/output error .*step_0000002"):
        save_checkpoint(tmp_path, 4, model, {"step": 4}, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest", "step_0000002",
    ]  # fmt: skip
    monkeypatch.undo()
    assert find_resumable(tmp_path)[0].name == "step_0000002"


def test_prepare_on_a_full_disk_stops_in_one_line_and_leaves_no_partial_shard(tiny_disk):
    out = tiny_disk("256k") / "data"
    line = one_error_line(run_minigpt("prepare", "builtin", "--out", out, check=False))
    assert re.search(rf"cannot write {out}/shakespeare_\w+\.bin: No space left on device", line)
    assert "rerun prepare" in line
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix in (".tmp", ".json")]
