"""FSDP and activation checkpointing against independent references: one process for FSDP on 2
gloo processes (pre-training and every fine-tuning stage), an uninterrupted run for resuming on
another number of processes, the plain backward for checkpointed blocks; the readers of a
sharded checkpoint, the memory bench, and the combinations refused at start."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from minigpt.checkpoints import CHECKSUMS, SHARDED, WEIGHTS, load_model
from minigpt.config import TrainSection
from minigpt.errors import EXIT_INTERRUPTED, MinigptError
from minigpt.model import GPT
from minigpt.train.parallel import check_parallel, checkpoint_blocks

from conftest import (
    FAULTY_MINIGPT,
    REPO,
    SRC,
    free_port,
    run_minigpt,
    tiny_config,
    write_shakespeare_shards,
)

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# the demo config at a CPU test size, dropout off (ranks draw different masks), the learning
# rate pinned: 4 steps of 256 tokens (1 process: 2 micro-steps; 2 processes: 1 each)
TINY = [
    "--model.preset=gpt2-nano", "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32",
    "--model.block_size=32", "--model.dropout=0.0", "--train.sequence_length=32",
    "--train.micro_batch=4", "--train.total_batch_tokens=256", "--train.warmup_steps=2",
    "--train.max_lr=1e-3", "--train.min_lr=1e-4", "--train.max_steps=4",
    "--train.checkpoint_every=2", "--train.keep_last=3", "--train.eval_every=2",
    "--eval.val_tokens=512", "--eval.sample_tokens=4", "--log.progress=false",
    "--train.optimizer=adamw",  # the demo trains with Muon, which FSDP does not run
]  # fmt: skip
FSDP = "--train.parallel=fsdp"


def torchrun(
    verb: str, *args, nproc: int = 2, fault: str | None = None, status: int = 0
) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=NPROC -m minigpt VERB ARGS` on gloo, one thread per process;
    with `fault`, `minigpt-torchrun` runs tests/faulty_minigpt.py, which injects it."""
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(SRC)}
    launcher = "torch.distributed.run" if fault is None else "minigpt.launch"
    cmd = [sys.executable, "-m", launcher, "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "minigpt"] if fault is None else [str(FAULTY_MINIGPT), fault]
    cmd += [verb, *map(str, args)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == status, result.stderr[-3000:]
    return result


def pretrain(*args, nproc: int = 1, **faults):
    config = REPO / "configs" / "demo-cpu.toml"
    if nproc == 1:
        return run_minigpt("train", config, *TINY, *map(str, args), env=ONE_THREAD)
    return torchrun("train", config, *TINY, *args, nproc=nproc, **faults)


def series(run, key: str = "train_loss") -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m[key] for m in lines if key in m}


def assert_same_run(run, reference, tol: float, key: str = "train_loss") -> None:
    """Every logged step of `run` matches `reference` within `tol`, and so do its final weights
    (consolidated from shards where sharded)."""
    ours, theirs = series(run, key), series(reference, key)
    assert ours and set(ours) <= set(theirs)
    losses = max(abs(ours[s] - theirs[s]) for s in ours)
    a, b = (load_model(r, head=None).state_dict() for r in (run, reference))
    assert a.keys() == b.keys()
    weights = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"{run.name} vs {reference.name}: {key} within {losses:.1e}, weights {weights:.1e}")
    assert losses < tol and weights < tol, (ours, theirs)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shakespeare_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def single(shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "single"
    pretrain(f"--data.dir={shards}", "--out", run)
    return run


@pytest.fixture(scope="module")
def fsdp(shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "fsdp"
    result = pretrain(f"--data.dir={shards}", "--out", run, FSDP, nproc=2)
    assert "2 process(es) sharded (fsdp)" in result.stdout
    return run


# ----------------------------------------------------------------------------- pre-training
def test_fsdp_on_two_processes_matches_one_process(fsdp, single):
    assert_same_run(fsdp, single, 1e-5)
    assert series(fsdp, "val_loss") == pytest.approx(series(single, "val_loss"), abs=1e-5)
    # the norm of the sharded gradients is the whole one (to fp32 rounding: 1e-6 at step 1,
    # where the weights are the same, 3e-5 by step 4), and clipping at 1.0 acted every step
    norms = series(fsdp, "grad_norm")
    assert norms == pytest.approx(series(single, "grad_norm"), rel=1e-4)
    assert min(norms.values()) > 1.0
    checkpoint = fsdp / "checkpoints" / "step_0000004"
    assert not (checkpoint / WEIGHTS).exists()  # one file per process, listed in the checksums
    shards = sorted(p.name for p in (checkpoint / SHARDED).glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    listed = json.loads((checkpoint / CHECKSUMS).read_text())["files"]
    assert {f"{SHARDED}/{name}" for name in shards} <= set(listed)
    model = load_model(fsdp)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after consolidating


def test_fsdp_resumes_a_one_process_checkpoint_on_two_processes_offloaded_and_recomputed(
    fsdp, single, shards, tmp_path
):
    """From the 1-process run's step 2 on 2 FSDP processes, with the shards offloaded to CPU
    memory and the blocks recomputed (neither changes the numbers): steps 3-4 as the
    uninterrupted FSDP run's."""
    run = tmp_path / "resumed"
    args = [f"--data.dir={shards}", "--out", run, FSDP, "--train.cpu_offload=true"]
    args += ["--train.activation_checkpointing=true"]
    pretrain(*args, "--resume", single / "checkpoints" / "step_0000002", nproc=2)
    assert sorted(series(run)) == [3, 4]
    assert_same_run(run, fsdp, 1e-6)


def test_one_process_resumes_a_two_process_sharded_checkpoint(fsdp, single, shards, tmp_path):
    run = tmp_path / "resumed"
    resumed = pretrain(f"--data.dir={shards}", "--out", run, "--resume",
                       fsdp / "checkpoints" / "step_0000002")  # fmt: skip
    assert "1 process(es) on cpu" in resumed.stdout
    assert sorted(series(run)) == [3, 4]
    assert_same_run(run, single, 1e-6)


def test_a_preempted_fsdp_run_checkpoints_its_shards_exits_75_and_resumes(fsdp, shards, tmp_path):
    """Each worker takes SIGTERM during step 3: all write their shards of step 3, exit 75, and
    `--resume latest` ends as the run never stopped."""
    run = tmp_path / "preempted"
    args = [f"--data.dir={shards}", "--out", run, FSDP]
    pretrain(*args, nproc=2, fault="sigterm:3", status=EXIT_INTERRUPTED)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert len(list((run / "checkpoints" / "step_0000003" / SHARDED).glob("*.distcp"))) == 2
    pretrain(*args, "--resume", "latest", nproc=2)
    assert_same_run(run, fsdp, 1e-6)


def test_every_reader_loads_a_sharded_checkpoint(fsdp, single, tmp_path):
    """`--model` verbs and the exporters consolidate the shards in one process: generate prints
    the 1-process run's text, the HF export reads back to the same weights, GGUF is written."""
    args = ["--prompt", "ROMEO:", "--max-new-tokens", "6", "--seed", "0", "--device", "cpu"]
    texts = [run_minigpt("generate", "--model", run, *args).stdout for run in (fsdp, single)]
    assert texts[0] == texts[1] and texts[0].strip()
    run_minigpt("export", "hf", fsdp, tmp_path / "hf")
    exported, ours = load_model(tmp_path / "hf").state_dict(), load_model(fsdp).state_dict()
    for state in (exported, ours):  # the importer starts the chat-token rows at the mean
        state["transformer.wte.weight"] = state.pop("lm_head.weight")[:50257]
    assert max((exported[k] - ours[k]).abs().max().item() for k in ours) < 1e-6
    run_minigpt("export", "gguf", fsdp, tmp_path / "model.gguf")
    assert (tmp_path / "model.gguf").stat().st_size > 4 * sum(v.numel() for v in ours.values()) // 2


# ----------------------------------------------------------------------------- the stages
PAIRS = ["--train.micro_batch=2", "--train.total_batch_tokens=256"]  # 4 sequences a forward
STAGES = {  # stage -> (config, its settings, the FSDP run's, tolerance)
    # 2 micro-steps per process: FSDP reduce-scatters once, after the second
    "sft": ("sft-demo-cpu.toml", [], ["--train.micro_batch=2"], 1e-5),
    # bf16: FSDP's mixed precision (bf16 weights gathered, fp32 reduction) against autocast
    "dpo": ("dpo-demo-cpu.toml", [*PAIRS, "--train.dtype=bfloat16"], [], 5e-2),
    "rm": ("rm-demo-cpu.toml", PAIRS, [], 1e-5),
    "rl": ("rl-verifiable-demo-cpu.toml", ["--rl.num_generations=4"], [], 1e-5),
}
# RL's reward: the share of reply tokens below id 25,000, which differs within every group of a
# random model's replies (the demo's verifiable reward would be 0 for all: nothing to learn)
LOW_IDS = """
def low_ids(prompts, completions, completion_ids, **kwargs):
    return [sum(t < 25000 for t in ids) / max(1, len(ids)) for ids in completion_ids]
"""


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_fine_tuning_stage_under_fsdp_matches_one_process(stage, single, tmp_path):
    """2 steps of each stage from the pre-trained tiny model: 2 FSDP processes log the losses
    of one process (2 micro-steps); RL samples its rollouts from the gathered weights, each
    rank its own prompts."""
    config, settings, sharded_settings, tol = STAGES[stage]
    if stage == "rl":
        (tmp_path / "rewards.py").write_text(LOW_IDS)
        settings = [*settings, f'--rl.reward=["{tmp_path / "rewards.py"}:low_ids"]']
    common = [
        REPO / "configs" / config, "--init", single, "--data.limit=64", "--train.max_steps=2",
        "--train.sequence_length=32", "--train.micro_batch=4", "--train.total_batch_tokens=256",
        "--train.warmup_steps=1", "--train.eval_every=2", "--train.checkpoint_every=2",
        "--eval.sample_tokens=0", "--log.progress=false", "--rl.max_completion_tokens=6",
        "--train.optimizer=adamw",
        *settings,
    ]  # fmt: skip
    one, sharded = tmp_path / "one", tmp_path / "fsdp"
    run_minigpt(stage, *common, "--out", one, env=ONE_THREAD)
    torchrun(stage, *common, "--out", sharded, FSDP, *sharded_settings)
    assert min(series(one, "grad_norm").values()) > 0  # it trained
    assert_same_run(sharded, one, tol)


# ----------------------------------------------------------------------------- in process
def test_activation_checkpointing_gives_the_same_gradients(one_thread):
    """Dropout on: the recomputed blocks replay the masks of the forward."""
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = GPT(tiny_config(dropout=0.1))
        if recompute:
            checkpoint_blocks(model)
        x = torch.randint(0, 50257, (2, 32))
        torch.manual_seed(1)
        _, loss = model(x, x)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    plain, recomputed = grads
    assert max((plain[n] - recomputed[n]).abs().max().item() for n in plain) < 1e-6


class RandomTokens:
    ignores_targets = False

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        tokens = torch.randint(0, 50257, (2, 17), generator=self.generator)
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self) -> dict:
        return {}


def _reduce_scatters_on_rank(rank: int, port: int, results) -> None:
    """One FSDP step of 2 micro-steps on this rank, counting FSDP's reduce-scatters."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from minigpt.config import LogSection
    from minigpt.train.distributed import DistContext
    from minigpt.train.trainer import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    reduce_scatter, calls = dist.reduce_scatter_single, []
    dist.reduce_scatter_single = lambda *a, **kw: calls.append(1) or reduce_scatter(*a, **kw)
    try:
        train = TrainSection(
            micro_batch=2, sequence_length=16, total_batch_tokens=128, parallel="fsdp",
            device="cpu", max_steps=2, warmup_steps=1,
        )  # fmt: skip
        log, ctx = LogSection(progress=False, tensorboard=False), DistContext(rank, rank, 2)
        trainer = Trainer(GPT(tiny_config()), train, log, RandomTokens(rank), "unused", ctx)
        trainer.train_step()
        trainer.batches.close()
        units = sum(isinstance(m, FSDPModule) for m in trainer.model.modules())
        results[rank] = (trainer.accum, units, len(calls))
    finally:
        dist.reduce_scatter_single = reduce_scatter
        dist.destroy_process_group()


def test_fsdp_reduce_scatters_gradients_once_per_step_not_per_micro_step():
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_reduce_scatters_on_rank, args=(free_port(), results), nprocs=2)
    for accum, units, calls in results.values():
        assert accum == 2 and units == 3  # 2 blocks and the root
        assert calls == units  # not accum x units


@pytest.mark.parametrize(
    "settings, world_size, dtype, message",
    [
        ({"parallel": "zero3"}, 2, torch.float32, "train.parallel='zero3'; choose one of ddp"),
        ({"cpu_offload": True}, 2, torch.float32, "needs train.parallel=fsdp"),
        ({"parallel": "fsdp", "cpu_offload": True}, 1, torch.float32, "at least 2 processes"),
        ({"parallel": "fsdp", "compile": True}, 2, torch.float32, "--train.compile=false"),
        ({"parallel": "fsdp"}, 2, torch.float16, "--train.dtype=bfloat16"),
        ({"parallel": "fsdp", "optimizer": "muon"}, 2, torch.float32, "--train.optimizer=adamw"),
    ],
)  # fmt: skip
def test_combinations_that_cannot_work_are_refused(settings, world_size, dtype, message):
    with pytest.raises(MinigptError, match=re.escape(message)):
        check_parallel(TrainSection(**settings), world_size, dtype)


def test_a_refused_combination_stops_the_cli_before_training(shards, tmp_path):
    result = run_minigpt(
        "train", REPO / "configs" / "demo-cpu.toml", *TINY, f"--data.dir={shards}",
        "--out", tmp_path / "run", "--train.cpu_offload=true", check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "train.cpu_offload=true" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- memory
def test_fsdp_keeps_at_most_six_tenths_of_ddps_training_state_per_process(tmp_path):
    """bench/memory.py on 2 processes: weights + gradients + AdamW state per process."""
    out = tmp_path / "memory.json"
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(REPO / "bench" / "memory.py"), "--preset=gpt2-nano", "--n-layer=2"]
    cmd += ["--seq=32", "--micro-batch=2", f"--json={out}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ratio = float(re.search(r"fsdp / ddp training state per process: ([\d.]+)", result.stdout)[1])
    assert ratio <= 0.6
    measured = json.loads(out.read_text())
    assert measured["ratio_fsdp_to_ddp_state"] == pytest.approx(ratio, abs=1e-3)
