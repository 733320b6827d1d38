"""The trainer against independent references: one big batch for gradient accumulation, one
process for DDP, an uninterrupted run for SIGKILL + resume; and the CLI end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from minigpt.checkpoints import LATEST, TRAINING_STATE, WEIGHTS, find_resumable
from minigpt.config import LogSection, TrainSection, load_config
from minigpt.data.shards import TokenLoader
from minigpt.errors import EXIT_INTERRUPTED, MinigptError
from minigpt.model import GPT
from minigpt.train.trainer import EvalHook, TokenLoss, Trainer

from conftest import FAULTY_MINIGPT, REPO, SRC, run_minigpt, tiny_config, write_shakespeare_shards

DEMO = REPO / "configs" / "demo-cpu.toml"
# the demo config shrunk to a CPU test size: 2 layers of width 32, 256 tokens per step (2 x 4 x 32)
TINY = [
    "--model.preset=gpt2-nano",
    "--model.n_layer=2",
    "--model.n_head=2",
    "--model.n_embd=32",
    "--model.block_size=32",
    "--model.dropout=0.1",  # so resuming must restore the RNG too
    "--train.sequence_length=32",
    "--train.micro_batch=4",
    "--train.total_batch_tokens=256",
    "--train.warmup_steps=2",
    "--train.max_steps=8",
    "--train.checkpoint_every=3",
    "--train.keep_last=2",
    "--train.eval_every=4",
    "--eval.val_tokens=512",
    "--eval.sample_tokens=4",
    "--log.progress=false",
]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # same arithmetic in every run, and gentle on shared CPUs


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shakespeare_shards(tmp_path_factory.mktemp("shards"))


def train(*args, **env):
    return run_minigpt("train", DEMO, *TINY, *map(str, args), env={**ONE_THREAD, **env})


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(run):
    return [(m["step"], m["train_loss"]) for m in metrics(run) if "train_loss" in m]


def final_weights(run):
    checkpoints = run / "checkpoints"
    return load_file(checkpoints / (checkpoints / LATEST).read_text().strip() / WEIGHTS)


@pytest.fixture(scope="module")
def baseline(shards, tmp_path_factory):
    """An uninterrupted 8-step run of the demo config (tiny overrides) through the CLI."""
    run = tmp_path_factory.mktemp("runs") / "baseline"
    train("--out", run, f"--data.dir={shards}")
    return run


# ----------------------------------------------------------------------------- in-process
def make_trainer(batches, micro_batch, total_tokens, seq_len, tmp_path, **train):
    torch.manual_seed(0)
    model = GPT(tiny_config())
    cfg = TrainSection(
        micro_batch=micro_batch,
        total_batch_tokens=total_tokens,
        sequence_length=seq_len,
        max_steps=10,
        warmup_steps=2,
        max_lr=1e-3,
        device="cpu",
        **train,
    )
    return Trainer(model, cfg, LogSection(progress=False, tensorboard=False), batches, tmp_path)


def max_param_diff(a: Trainer, b: Trainer) -> float:
    return max(
        (p - q).abs().max().item()
        for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True)
    )


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_accumulated_micro_batches_equal_one_big_batch(shards, tmp_path, optimizer):
    loader = lambda micro: TokenLoader(shards, "train", micro, 16, seed=0)  # noqa: E731
    accumulated = make_trainer(loader(2), 2, 128, 16, tmp_path, optimizer=optimizer)
    big = make_trainer(loader(8), 8, 128, 16, tmp_path, optimizer=optimizer)
    assert (accumulated.accum, big.accum) == (4, 1)
    for _ in range(3):
        a, b = accumulated.train_step(), big.train_step()
        # float32 sums in another order: a loss near 10.8 is exact to ~1e-6 absolute
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    assert max_param_diff(accumulated, big) < 1e-6


class FixedBatches:
    """A BatchSource replaying given batches, like fine-tuning's padded conversations."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self):
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def test_masked_targets_weigh_every_counted_token_equally(tmp_path):
    """Micro-batches with different numbers of -100 targets still give the big batch's
    token-mean loss and gradient (a plain mean of micro-batch means would not)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50257, (8, 16), generator=generator)
    y = torch.randint(0, 50257, (8, 16), generator=generator)
    y[0, :12] = -100
    y[3, :] = -100
    y[5, 4:] = -100
    micro = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)]
    accumulated = make_trainer(FixedBatches(micro), 2, 128, 16, tmp_path)
    big = make_trainer(FixedBatches([(x, y)]), 8, 128, 16, tmp_path)
    with torch.no_grad():
        logits, _ = big.model(x)
        expected = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100)
    a, b = accumulated.train_step(), big.train_step()
    assert a["train_loss"] == pytest.approx(expected.item(), abs=1e-6)
    assert b["train_loss"] == pytest.approx(expected.item(), abs=1e-6)
    assert max_param_diff(accumulated, big) < 1e-6


def test_mfu_is_the_models_training_flops_per_second_over_the_peak(tmp_path):
    """The one MFU computation: what a step logs and bench/train_throughput.py reports."""
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    trainer = make_trainer(FixedBatches([(x, x)]), 2, 32, 16, tmp_path)
    stats = trainer.train_step()
    assert stats["flops"] == 32 * trainer.model.flops_per_token(16)
    assert trainer.mfu(stats["flops"], 2.0) is None  # no known peak on a CPU
    assert "mfu" not in trainer._train_metrics(stats, 2.0)
    trainer.peak_flops = 1e12
    expected = trainer.model.flops_per_token(16) * (32 / 2.0) / 1e12
    assert trainer.mfu(stats["flops"], 2.0) == pytest.approx(expected)
    assert trainer._train_metrics(stats, 2.0)["mfu"] == pytest.approx(expected)


# ----------------------------------------------------------------------------- CLI end to end
def test_cli_writes_metrics_log_tensorboard_checkpoints_and_config(baseline, shards):
    records = metrics(baseline)
    assert [s for s, _ in train_losses(baseline)] == list(range(1, 9))
    train_line = next(m for m in records if "train_loss" in m)
    assert {"lr", "grad_norm", "tokens_per_sec"} <= set(train_line)
    evals = [m for m in records if "val_loss" in m]
    assert [m["step"] for m in evals] == [0, 4, 8]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert len(evals[0]["samples"]) == 2 and evals[0]["samples"][0].startswith("ROMEO:")
    log = (baseline / "log.txt").read_text().splitlines()
    assert log[0] == f"0 val {evals[0]['val_loss']:.4f}"
    assert re.fullmatch(r"1 train \d+\.\d{6}", log[1])
    assert list((baseline / "tb").glob("events.out.tfevents.*"))
    checkpoints = sorted(p.name for p in (baseline / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step_0000006", "step_0000008"]  # keep_last=2
    assert (baseline / "checkpoints" / "step_0000008" / TRAINING_STATE).is_file()
    resolved = load_config(baseline / "config.toml")
    assert resolved.data.dir == str(shards) and resolved.model.n_embd == 32


def test_cli_plot_overlays_runs(baseline, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(baseline, other)
    out = tmp_path / "loss.png"
    run_minigpt("plot", baseline, other, "--out", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- exact resume
def assert_same_run(resumed, baseline):
    assert train_losses(resumed) == train_losses(baseline)  # exact floats, one line per step
    val = lambda run: [(m["step"], m["val_loss"]) for m in metrics(run) if "val_loss" in m]  # noqa: E731
    assert val(resumed) == val(baseline)
    expected, got = final_weights(baseline), final_weights(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_sigkill_between_checkpoints_then_resume_is_bit_identical(baseline, shards, tmp_path):
    run = tmp_path / "killed"
    killed = run_minigpt(
        "train", DEMO, *TINY, "--out", run, f"--data.dir={shards}",
        check=False, fault="step:5", env=ONE_THREAD,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / LATEST).read_text().strip() == "step_0000003"
    assert train_losses(run)[-1][0] == 5  # it got past the checkpoint before dying
    train("--out", run, "--resume", "latest", f"--data.dir={shards}")
    assert_same_run(run, baseline)


def test_sigkill_during_checkpoint_write_then_resume_is_bit_identical(baseline, shards, tmp_path):
    run = tmp_path / "killed"
    killed = run_minigpt(
        "train", DEMO, *TINY, "--out", run, f"--data.dir={shards}",
        check=False, fault="checkpoint:6", env=ONE_THREAD,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / ".tmp-step_0000006" / WEIGHTS).is_file()  # half-done
    assert (run / "checkpoints" / LATEST).read_text().strip() == "step_0000003"
    resumed = train("--out", run, "--resume", "latest", f"--data.dir={shards}")
    assert "resuming from" in resumed.stdout and "step_0000003" in resumed.stdout
    assert_same_run(run, baseline)
    assert not (run / "checkpoints" / ".tmp-step_0000006").exists()


@pytest.mark.parametrize("damaged", [WEIGHTS, TRAINING_STATE])
def test_corrupt_latest_checkpoint_falls_back_to_previous(baseline, tmp_path, damaged):
    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    path = run / "checkpoints" / "step_0000008" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a torn write
    with pytest.warns(UserWarning, match="skipping unusable checkpoint.*step_0000008"):
        directory, model, state = find_resumable(run)
    assert directory.name == "step_0000006" and state["step"] == 6
    assert isinstance(model, GPT)


# ----------------------------------------------------------------------------- DDP
DDP_ARGS = [*TINY, "--model.dropout=0.0", "--train.max_steps=3"]


@pytest.fixture(scope="module")
def single(shards, tmp_path_factory):
    """3 steps in one process (accumulation 2), dropout off: what data parallelism must equal."""
    run = tmp_path_factory.mktemp("runs") / "single"
    train(*DDP_ARGS[len(TINY) :], "--out", run, f"--data.dir={shards}")
    return run


def assert_matches_single(run, single):
    for (s1, l1), (s2, l2) in zip(train_losses(single), train_losses(run), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5)
    a, b = final_weights(single), final_weights(run)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_two_gloo_processes_match_one_process(single, shards, tmp_path):
    """torchrun with 2 CPU processes (accumulation 1 each) against one process (accumulation
    2), same 256-token batches, with the demo's Muon: every rank takes the same step."""
    ddp = tmp_path / "ddp"
    args = [*DDP_ARGS, f"--data.dir={shards}", "--out", ddp]
    result = torchrun("--standalone", "--nproc_per_node=2", train_args=args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert_matches_single(ddp, single)


def test_adamw_under_two_gloo_processes_matches_one_process(shards, tmp_path):
    """The demo trains with Muon; the 124M recipe's AdamW, 2 processes against 1."""
    adamw = [*DDP_ARGS, "--train.optimizer=adamw", "--train.max_lr=1e-3", f"--data.dir={shards}"]
    single = tmp_path / "single"
    train(*adamw[len(TINY) :], "--out", single)
    result = torchrun(
        "--standalone", "--nproc_per_node=2", train_args=[*adamw, "--out", tmp_path / "ddp"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_matches_single(tmp_path / "ddp", single)


def test_two_nodes_on_loopback_match_one_process(single, shards, tmp_path):
    """Two torchrun launchers (--nnodes=2, one process each) meeting through a c10d rendezvous
    on 127.0.0.1, as two machines would."""
    run = tmp_path / "nodes"
    with socket.socket() as s:  # a free port for the rendezvous store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [*DDP_ARGS, f"--data.dir={shards}", "--out", run]
    launchers = [
        torchrun(
            "--nnodes=2",
            "--nproc_per_node=1",
            "--rdzv-backend=c10d",
            "--rdzv-id=loopback",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-conf=is_host={int(host)}",
            train_args=args,
            background=True,
        )  # fmt: skip
        for host in (True, False)
    ]
    outputs = [p.communicate(timeout=600) for p in launchers]
    for p, (_, err) in zip(launchers, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert sum("2 process(es)" in out for out, _ in outputs) == 1  # rank 0 is on one node
    assert_matches_single(run, single)


def test_training_into_an_existing_run_without_resume_is_refused(baseline, shards):
    result = run_minigpt(
        "train", DEMO, *TINY, "--out", baseline, f"--data.dir={shards}", check=False
    )
    assert result.returncode == 2
    assert "already holds a run" in result.stderr and "--resume latest" in result.stderr


def test_eval_hooks_run_on_schedule_and_reach_every_log(shards, tmp_path):
    """The extension point HellaSwag plugs into: a hook's metrics land in metrics.jsonl,
    log.txt (`{step} hella {acc_norm}`) and TensorBoard at its own cadence and at the end."""
    calls = []

    def fake_hellaswag(step, model):
        calls.append((step, model.training))
        return {"hellaswag_acc_norm": step / 100}

    trainer = make_trainer(TokenLoader(shards, "train", 2, 16, seed=0), 2, 32, 16, tmp_path)
    trainer.cfg.max_steps, trainer.cfg.eval_every, trainer.cfg.checkpoint_every = 5, 0, 0
    trainer.log_cfg.tensorboard = True
    trainer.eval_hooks = [EvalHook("hellaswag", 2, fake_hellaswag)]
    trainer.fit()
    assert calls == [(0, False), (2, False), (4, False), (5, False)]  # eval mode every time
    logged = [(m["step"], m["hellaswag_acc_norm"]) for m in metrics(tmp_path) if len(m) == 2]
    assert logged == [(0, 0.0), (2, 0.02), (4, 0.04), (5, 0.05)]
    assert "4 hella 0.0400" in (tmp_path / "log.txt").read_text().splitlines()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "step_0000005" / WEIGHTS).is_file()  # the final one


def test_an_eval_whose_hooks_have_nothing_due_logs_no_line(shards, tmp_path):
    """A hook of parts on several cadences runs at their gcd and returns {} where none is due:
    such a step leaves no empty record."""
    trainer = make_trainer(TokenLoader(shards, "train", 2, 16, seed=0), 2, 32, 16, tmp_path)
    trainer.cfg.max_steps, trainer.cfg.eval_every, trainer.cfg.checkpoint_every = 3, 0, 0
    due_at_3 = lambda step, model: {"score": step} if step % 3 == 0 else {}  # noqa: E731
    trainer.eval_hooks = [EvalHook("parts", 1, due_at_3)]
    trainer.fit()
    assert [m for m in metrics(tmp_path) if "train_loss" not in m] == [
        {"step": 0, "score": 0},
        {"step": 3, "score": 3},
    ]


def test_hellaswag_during_training_is_logged_and_matches_the_standalone_evaluator(shards, tmp_path):
    from test_hellaswag import official_rows, write_jsonl

    from minigpt.checkpoints import load_model
    from minigpt.evals.hellaswag import evaluate, load_examples

    data = tmp_path / "hellaswag_val.jsonl"
    write_jsonl(data, official_rows(12))
    run = tmp_path / "hella"
    train(
        "--out", run, f"--data.dir={shards}", "--train.max_steps=4", "--train.checkpoint_every=4",
        "--eval.hellaswag_every=4", f"--eval.hellaswag_data={data}", "--eval.hellaswag_limit=10",
    )  # fmt: skip
    scored = [m for m in metrics(run) if "hellaswag_acc_norm" in m]
    assert [m["step"] for m in scored] == [0, 4]
    standalone = evaluate(load_model(run), load_examples(data, limit=10), "cpu")
    assert scored[-1]["hellaswag_acc_norm"] == pytest.approx(standalone["acc_norm"])
    assert scored[-1]["hellaswag_acc"] == pytest.approx(standalone["acc"])
    assert f"4 hella {standalone['acc_norm']:.4f}" in (run / "log.txt").read_text().splitlines()


# ----------------------------------------------------------------------------- faults, restarts
def test_sigterm_checkpoints_exits_75_and_resume_is_bit_identical(baseline, shards, tmp_path):
    """SIGTERM (a preemption notice) during step 5: the step finishes, a checkpoint is written
    off the step schedule, the exit status is 75; resuming ends exactly like the baseline."""
    run = tmp_path / "preempted"
    stopped = run_minigpt(
        "train", DEMO, *TINY, "--out", run, f"--data.dir={shards}",
        check=False, fault="sigterm:5", env=ONE_THREAD,
    )  # fmt: skip
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stderr[-2000:]
    assert "SIGTERM after step 5" in stopped.stderr and "--resume latest" in stopped.stderr
    assert (run / "checkpoints" / LATEST).read_text().strip() == "step_0000005"
    train("--out", run, "--resume", "latest", f"--data.dir={shards}")
    assert_same_run(run, baseline)
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step_0000006", "step_0000008"]  # the step schedule holds


def test_resume_latest_without_a_checkpoint_starts_from_scratch(baseline, shards, tmp_path):
    """One command line for first start and restarts: killed before its first checkpoint, the
    same `--resume latest` command starts over, drops the dead attempt's records, and ends
    like the baseline."""
    run = tmp_path / "early"
    args = ["--out", run, "--resume", "latest", f"--data.dir={shards}"]
    killed = run_minigpt("train", DEMO, *TINY, *args, check=False, fault="step:2", env=ONE_THREAD)
    assert killed.returncode == -signal.SIGKILL
    assert train_losses(run)[-1][0] == 2 and not (run / "checkpoints").exists()
    again = train(*args)
    assert "no checkpoint yet, starting from scratch" in again.stdout
    assert_same_run(run, baseline)


def test_resume_from_an_older_checkpoint_sets_the_abandoned_branch_aside(
    baseline, shards, tmp_path
):
    """Resuming a run that reached step 8 from step 6 abandons step 8: it is moved aside, so
    keep_last keeps the live branch (6, 7) and `latest` and every lookup see only that."""
    run = tmp_path / "branch"
    shutil.copytree(baseline, run)
    checkpoints = run / "checkpoints"
    step_6 = checkpoints / "step_0000006"
    result = train("--resume", step_6, "--train.max_steps=7", f"--data.dir={shards}")
    assert (
        f"moved 1 checkpoint(s) past step 6 (step_0000008), an abandoned branch, to "
        f"{checkpoints / 'abandoned'}" in result.stdout
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "abandoned",
        "latest",
        "step_0000006",
        "step_0000007",
    ]
    assert (checkpoints / LATEST).read_text().strip() == "step_0000007"
    assert (checkpoints / "abandoned" / "step_0000008" / WEIGHTS).is_file()
    assert find_resumable(run)[0] == checkpoints / "step_0000007"


def test_set_aside_future_points_latest_at_the_newest_checkpoint_left(tmp_path):
    from minigpt.checkpoints import checkpoint_candidates, save_checkpoint, set_aside_future

    model = GPT(tiny_config())
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep_last=0)
    assert set_aside_future(tmp_path, 6) == []
    moved = set_aside_future(tmp_path, 3)
    assert [p.name for p in moved] == ["step_0000006", "step_0000004"]
    assert checkpoint_candidates(tmp_path) == [tmp_path / "checkpoints" / "step_0000002"]
    assert (tmp_path / "checkpoints" / LATEST).read_text().strip() == "step_0000002"


def torchrun(
    *launcher_args, train_args, fault=None, background=False, launcher="torch.distributed.run"
):
    """`torchrun LAUNCHER_ARGS -m minigpt train DEMO TRAIN_ARGS`; with `fault`, the workers run
    tests/faulty_minigpt.py instead, which injects that fault in the first attempt."""
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", launcher, *launcher_args]
    cmd += ["-m", "minigpt"] if fault is None else [str(FAULTY_MINIGPT), fault]
    cmd += ["train", str(DEMO), *map(str, train_args)]
    if background:
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_worker_sigkilled_under_torchrun_restarts_and_ends_bit_identical(
    baseline, shards, tmp_path
):
    run = tmp_path / "elastic"
    result = torchrun(
        "--standalone", "--nproc_per_node=1", "--max-restarts=1",
        train_args=[*TINY, "--out", run, "--resume", "latest", f"--data.dir={shards}"],
        fault="step:5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout and "step_0000003" in result.stdout  # it did die
    assert_same_run(run, baseline)


# what the README tells SLURM users: torchrun passes on only the signals it is told to handle
# no schedule checkpoints and no evaluations, so any checkpoint is the stop signal's
UNTIL_STOPPED = [
    "--model.dropout=0.0",
    "--train.checkpoint_every=0",
    "--train.eval_every=0",
    "--eval.sample_tokens=0",
]


def wait_for_a_step(run, process, timeout=300):
    log, deadline = run / "metrics.jsonl", time.monotonic() + timeout
    while not (log.is_file() and '"train_loss"' in log.read_text()):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no training step logged"
        time.sleep(0.05)


def test_sigusr1_to_minigpt_torchrun_checkpoints_every_worker_exits_75_and_resumes(
    shards, tmp_path
):
    """SLURM's preemption notice (`--signal=USR1@120`) reaches the launcher, which forwards it to
    its workers; they finish the step, checkpoint and exit 75, and so does the launcher (plain
    torchrun would die on SIGUSR1, or exit 1 with the signal forwarded)."""
    run = tmp_path / "preempted"
    args = [*TINY, *UNTIL_STOPPED, "--train.max_steps=100000", f"--data.dir={shards}"]
    launcher = torchrun(
        "--standalone", "--nproc_per_node=2", train_args=[*args, "--out", run], background=True,
        launcher="minigpt.launch",
    )  # fmt: skip
    try:
        wait_for_a_step(run, launcher)
        launcher.send_signal(signal.SIGUSR1)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:  # SIGTERM, which torchrun forwards: no worker left behind
            launcher.terminate()
            launcher.communicate(timeout=120)
    assert launcher.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    stops = re.findall(r"minigpt: stopped by SIGUSR1 after step (\d+), checkpoint written", stderr)
    assert len(stops) == 2 and stops[0] == stops[1], stderr[-3000:]  # each worker on its way to 75
    step = int(stops[0])
    assert (run / "checkpoints" / LATEST).read_text().strip() == f"step_{step:07d}"
    assert train_losses(run)[-1][0] == step
    resumed = train(
        *UNTIL_STOPPED, "--out", run, "--resume", "latest", f"--data.dir={shards}",
        f"--train.max_steps={step + 2}",
    )  # fmt: skip
    assert f"at step {step}" in resumed.stdout
    assert [s for s, _ in train_losses(run)] == list(range(1, step + 3))


def test_minigpt_torchrun_exits_75_when_every_worker_stopped_and_checkpointed(shards, tmp_path):
    """Workers that each take a stop signal themselves (the sigterm fault: each sends itself
    SIGTERM during step 3) all exit 75: the launcher says 75 too, not torchrun's 1."""
    run = tmp_path / "stopped"
    result = torchrun(
        "--standalone", "--nproc_per_node=2", launcher="minigpt.launch",
        train_args=[*TINY, "--out", run, f"--data.dir={shards}"], fault="sigterm:3",
    )  # fmt: skip
    assert result.returncode == EXIT_INTERRUPTED, result.stderr[-3000:]
    assert (run / "checkpoints" / LATEST).read_text().strip() == "step_0000003"


# ----------------------------------------------------------------------------- GPU paths on CPU
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_trains_evaluates_checkpoints_and_resumes(
    shards, tmp_path, dtype, optimizer
):
    """bf16 autocast, and fp16 autocast with a GradScaler, as on GPUs (CPU autocast runs the same
    code): finite losses, validation and samples under the training autocast, a checkpoint that
    resumes."""
    from minigpt.data.shards import ValidationSet
    from minigpt.train.pretrain import sampling_hook

    def trainer():
        loader = TokenLoader(shards, "train", 2, 16, seed=0)
        t = make_trainer(
            loader, 2, 64, 16, tmp_path, dtype=dtype, checkpoint_every=2, optimizer=optimizer
        )
        t.cfg.max_steps, t.cfg.eval_every = 4, 2
        assert t.dtype == getattr(torch, dtype)
        t.val_data = ValidationSet(shards, 16, 64, 2)
        t.eval_hooks = [sampling_hook(["ROMEO:"], 3, 5, 2, seed=0)]
        return t

    first = trainer()
    first.cfg.max_steps = 2
    first.fit()
    resumed = trainer()
    resumed.resume(tmp_path)
    assert resumed.step == 2 and resumed.scaler.is_enabled() == (dtype == "float16")
    resumed.fit()
    records = metrics(tmp_path)
    losses = [m["train_loss"] for m in records if "train_loss" in m]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert [m["step"] for m in records if "val_loss" in m] == [0, 2, 4]
    assert all(np.isfinite(m["val_loss"]) for m in records if "val_loss" in m)
    assert records[-1]["samples"][0].startswith("ROMEO:")
    assert (tmp_path / "checkpoints" / "step_0000004" / WEIGHTS).is_file()


def test_muon_steps_under_compile_as_in_eager_mode_at_its_own_learning_rate(shards, tmp_path):
    """The compiled forward hands Muon the gradients eager mode does; Muon's matrices follow
    the schedule at muon_lr / max_lr times AdamW's rate."""
    runs = []
    for compile in (False, True):
        loader = TokenLoader(shards, "train", 2, 16, seed=0)
        trainer = make_trainer(loader, 2, 64, 16, tmp_path, optimizer="muon", compile=compile)
        losses = [trainer.train_step()["train_loss"] for _ in range(3)]
        runs.append((trainer, losses))
    (eager, eager_losses), (compiled, compiled_losses) = runs
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    assert max_param_diff(eager, compiled) < 1e-4
    muon_group, adamw_group, _ = compiled.optimizer.param_groups
    assert muon_group["lr"] == pytest.approx(adamw_group["lr"] * 0.02 / 1e-3)


def test_compiled_pretraining_and_finetuning_train_resume_and_sample(shards, tmp_path):
    """train.compile=true builds with inductor on the CPU: pre-training, a resume, samples after
    compiled steps, then fine-tuning (batches padded to length buckets) from that model."""
    from test_sft import CONVERSATIONS, _write_config

    run = tmp_path / "compiled"
    common = [
        "--out", run, f"--data.dir={shards}", "--train.compile=true", "--model.dropout=0.0",
        "--train.checkpoint_every=2", "--train.eval_every=2",
    ]  # fmt: skip
    train(*common, "--train.max_steps=2")
    train(*common, "--train.max_steps=3", "--resume", "latest")
    records = metrics(run)
    assert [s for s, _ in train_losses(run)] == [1, 2, 3]
    assert all(np.isfinite([loss for _, loss in train_losses(run)]))
    assert [m["step"] for m in records if "samples" in m] == [0, 2, 3]
    assert (run / "checkpoints" / "step_0000003" / WEIGHTS).is_file()
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    sft = tmp_path / "sft"
    run_minigpt(
        "sft", _write_config(tmp_path, data), "--init", run, "--out", sft,
        "--train.compile=true", "--train.max_steps=2", "--train.micro_batch=4",
        env=ONE_THREAD,  # 4 x 32 as in pre-training: inductor's cache serves the same graph
    )  # fmt: skip
    sft_records = metrics(sft)
    assert all(np.isfinite(m["train_loss"]) for m in sft_records if "train_loss" in m)
    assert any("chat_samples" in m for m in sft_records)
    assert (sft / "checkpoints" / "step_0000002" / WEIGHTS).is_file()


# ----------------------------------------------------------------------------- units
def test_checkpoints_by_wall_clock_besides_the_step_schedule(shards, tmp_path):
    trainer = make_trainer(TokenLoader(shards, "train", 2, 16, seed=0), 2, 32, 16, tmp_path)
    trainer.cfg.max_steps, trainer.cfg.eval_every, trainer.cfg.keep_last = 3, 0, 0
    trainer.cfg.checkpoint_every, trainer.cfg.checkpoint_minutes = 0, 1e-9  # always due
    trainer.fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_0000001", "step_0000002", "step_0000003"]


def test_prefetcher_hands_out_the_source_stream_and_its_consumed_position(shards):
    from minigpt.train.prefetch import StepPrefetcher

    direct = TokenLoader(shards, "train", 2, 16, seed=3)
    prefetcher = StepPrefetcher(TokenLoader(shards, "train", 2, 16, seed=3), 3, TokenLoss().count)
    assert not prefetcher.ignores_targets  # token windows: every target counts
    for _ in range(4):
        step = prefetcher.next_step()
        assert step.counts == [32, 32, 32]
        for x, y in step.micro_batches:
            ex, ey = direct.next_batch()
            assert torch.equal(x, ex) and torch.equal(y, ey)
        assert prefetcher.state_dict() == direct.state_dict()  # not the read-ahead position
    restored = StepPrefetcher(TokenLoader(shards, "train", 2, 16, seed=3), 3, TokenLoss().count)
    restored.load_state_dict(prefetcher.state_dict())
    a, b = prefetcher.next_step(), restored.next_step()
    assert all(
        torch.equal(p[0], q[0]) for p, q in zip(a.micro_batches, b.micro_batches, strict=True)
    )
    prefetcher.close()


def test_config_errors_are_printed_by_rank_0_only(tmp_path):
    bad = ["--train.max_stepz=3"]
    rank0 = run_minigpt("train", DEMO, *bad, check=False, env={"RANK": "0"})
    rank1 = run_minigpt("train", DEMO, *bad, check=False, env={"RANK": "1"})
    assert rank0.returncode == rank1.returncode == 2
    assert rank0.stderr.count("unknown config key") == 1 and rank1.stderr == ""


def test_collective_timeout_from_the_config_reaches_the_process_group(monkeypatch, tmp_path):
    from datetime import timedelta

    from minigpt.train.pretrain import pretrain

    class Joined(Exception):
        pass

    def init_process_group(**kwargs):
        raise Joined(kwargs["timeout"])  # stop the run here: the group is all this test needs

    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    config = load_config(DEMO, {"train.dist_timeout_minutes": "90", "train.device": "cpu"})
    with pytest.raises(Joined) as joined:
        pretrain(config, tmp_path / "run")
    assert joined.value.args == (timedelta(minutes=90),)


@pytest.mark.parametrize("minutes", ["0", "-5", "nan", "inf"])
def test_a_collective_timeout_that_is_not_positive_minutes_is_refused(minutes, tmp_path):
    from minigpt.train.pretrain import pretrain

    config = load_config(DEMO, {"train.dist_timeout_minutes": minutes})
    with pytest.raises(MinigptError, match=r"train.dist_timeout_minutes=\S+ must be a positive"):
        pretrain(config, tmp_path / "run")
