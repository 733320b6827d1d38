"""Nothing lost under faults: a training run SIGKILLed at seeded random moments (inside
checkpoint writing too) ends bit-identical to one never stopped, and a disk that fills up or
fails mid-write leaves every earlier checkpoint intact and stops with one line naming the file."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_train import DEMO, ONE_THREAD, TINY, assert_same_run

from minigpt.checkpoints import LATEST

from conftest import run_minigpt, write_shakespeare_shards

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


def drill_train(run, shards, fault=None, resume=True):
    args = ["train", DEMO, *DRILL, "--out", run, f"--data.dir={shards}"]
    resume_args = ["--resume", "latest"] if resume else []
    return run_minigpt(*args, *resume_args, fault=fault, env=ONE_THREAD)


def test_twenty_sigkills_at_random_moments_then_resumes_end_bit_identical(shards, tmp_path):
    with ThreadPoolExecutor(3) as pool:  # OMP_NUM_THREADS=1 each: the chains share the cores
        baseline = pool.submit(drill_train, tmp_path / "baseline", shards, resume=False)
        chains = [
            pool.submit(drill_train, tmp_path / f"chain{seed}", shards, fault)
            for seed, fault in DRILLS.items()
        ]
        baseline.result()
        killed_at = [re.search(r"killed at events (\[.*\])", c.result().stdout)[1] for c in chains]
    assert sum(len(json.loads(events)) for events in killed_at) == 20
    for seed in DRILLS:
        run = tmp_path / f"chain{seed}"
        assert_same_run(run, tmp_path / "baseline")
        assert (run / "checkpoints" / LATEST).read_text().strip() == "step_0000016"
        assert not list((run / "checkpoints").glob(".tmp-*"))  # half-written ones cleared
