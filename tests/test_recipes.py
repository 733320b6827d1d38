"""Every config in configs/ runs as shipped: a dry run per recipe, so a GPU-only crash in a hook
that a shipped config switches on cannot land unseen.

A dry run is the config's own verb (train, sft, dpo, rm or rl) through the CLI, with the config's dtype,
compile setting, evaluations, hooks and sample prompts, 2 steps, a checkpoint, then a resume to
step 3. Only the model size and the data are overridden: a tiny model, the bundled Shakespeare or
fixture records in the config's own data format instead of the hub dataset, and the batch of the
124M recipe shrunk to CPU size. A config whose dtype is `auto` runs twice, with `auto` read as on
an Ampere-or-newer GPU (bf16 autocast) and as on a V100 (fp16 autocast with a GradScaler): the
CPU's autocast runs the same code. A new config gets its dry run by being in configs/; one whose
verb or data format has no fixture here fails until it gets one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from minigpt import device as policy
from minigpt.checkpoints import WEIGHTS, find_resumable, save_model
from minigpt.cli import main
from minigpt.model import GPT, GPTConfig
from minigpt.reward import RewardModel
from minigpt.train.optim import optimizer_name

from conftest import REPO, write_shakespeare_shards

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = sorted((REPO / "configs").glob("*.toml"))
# "auto" as a GPU reads it: (name, the dtype auto means there)
AUTO_AS = {"ampere": torch.bfloat16, "v100": torch.float16}
# the model size of every dry run (pre-training shape overrides; fine-tuning starts from it)
TINY = dict(n_layer=2, n_head=2, n_embd=32)


def verb_of(config: dict) -> str:
    for verb in ("dpo", "rm", "rl"):
        if verb in config:
            return verb
    return "sft" if config.get("data", {}).get("source") else "train"


def dry_runs():
    for path in CONFIGS:
        config = tomllib.loads(path.read_text())
        dtype = config.get("train", {}).get("dtype", "auto")
        for auto_as in AUTO_AS if dtype == "auto" else [None]:
            name = path.stem + (f"-auto-as-{auto_as}" if auto_as else "")
            yield pytest.param(path, auto_as, id=name)


# ----------------------------------------------------------------------------- fixture data
def _alpaca(i: int) -> dict:
    return {"instruction": f"Name {i % 7 + 1} colours.", "input": "" if i % 2 else f"case {i}",
            "output": " ".join(["red, green and blue."] * (i % 5 + 1))}  # fmt: skip


def _dolly(i: int) -> dict:
    return {"instruction": f"Summarise note {i}.", "context": "The bell rang. " * (i % 4),
            "response": "It rang " + "again " * (i % 6) + ".", "category": "summarization"}  # fmt: skip


def _hh_rlhf(i: int) -> dict:
    prompt = f"\n\nHuman: How do I water plant {i}?" + " Please be brief." * (i % 3)
    return {"chosen": prompt + "\n\nAssistant: A little every day" + ", gently" * (i % 5) + ".",
            "rejected": prompt + "\n\nAssistant: Never."}  # fmt: skip


# local records in each hub dataset's own format: (file suffix, record maker)
FIXTURES = {
    "alpaca": (".json", _alpaca),
    "dolly": (".jsonl", _dolly),
    "hh-rlhf": (".jsonl", _hh_rlhf),
}


def fixture_source(data: dict, directory: Path) -> list[str]:
    """The --data.* overrides that replace a hub dataset by local records of its format; none
    for an offline source (chitchat, bundled with the package)."""
    source, fmt = data.get("source", ""), data.get("format", "")
    if "/" not in source or Path(source).exists():
        return []
    if fmt not in FIXTURES:
        raise AssertionError(f"no fixture records for data.format={fmt!r}: add a maker to FIXTURES")
    suffix, make = FIXTURES[fmt]
    records = [make(i) for i in range(48)]
    path = directory / f"{fmt}{suffix}"
    text = (
        json.dumps(records)
        if suffix == ".json"
        else "".join(map("{}\n".format, map(json.dumps, records)))
    )
    path.write_text(text)
    return [f"--data.source={path}", "--data.limit=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shakespeare_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def init_model(tmp_path_factory):
    """What fine-tuning starts from: a tiny GPT with GPT-2's 1,024-token context."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("init") / "model"
    save_model(directory, GPT(GPTConfig(**TINY)))
    # what rl dry runs score with: a reward model on the same trunk
    save_model(
        directory.parent / "reward-model", RewardModel.from_language_model(GPT(GPTConfig(**TINY)))
    )
    return directory


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory):
    from test_hellaswag import official_rows, write_jsonl

    path = tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl"
    write_jsonl(path, official_rows(6))
    return path


def scheduled_tasks(ev: dict) -> list[str]:
    """The tasks a config's [eval.task.<name>] tables switch on."""
    return [name for name, table in ev.get("task", {}).items() if table.get("every", 0) > 0]


def overrides(config: dict, verb: str, shards: Path, hellaswag: Path, directory: Path):
    """The dry run's size and data overrides, and the schedule: evaluate and checkpoint at 2."""
    args = ["--train.max_steps=2", "--train.warmup_steps=1", "--train.eval_every=2",
            "--train.checkpoint_every=2"]  # fmt: skip
    ev = config.get("eval", {})
    if verb == "train":
        args += [f"--model.{k}={v}" for k, v in TINY.items()]
        # the 124M recipe's 524,288-token step through a tiny model is minutes of CPU: 2 x 64
        # tokens per micro-batch, accumulated twice as the recipe accumulates
        args += ["--train.micro_batch=2", "--train.sequence_length=64",
                 "--train.total_batch_tokens=256", "--eval.val_tokens=256",
                 f"--data.dir={shards}"]  # fmt: skip
        if ev.get("hellaswag_every", 0) > 0:
            args += ["--eval.hellaswag_every=2", f"--eval.hellaswag_data={hellaswag}",
                     "--eval.hellaswag_limit=4", "--eval.hellaswag_batch_size=2"]  # fmt: skip
        for name in scheduled_tasks(ev):
            if name != "hellaswag":
                raise AssertionError(f"no fixture rows for [eval.task.{name}]: add them here")
            key = f"--eval.task.{name}"
            args += [f"{key}.every=2", f"{key}.data={hellaswag}", f"{key}.limit=4",
                     f"{key}.batch_size=2"]  # fmt: skip
        if ev.get("tasks_every", 0) > 0:
            args += ["--eval.tasks_every=2", "--eval.tasks_limit=4"]
    else:
        args += fixture_source(config.get("data", {}), directory)
    return args


def rl_overrides(config: dict, init_model: Path) -> list[str]:
    """An rl dry run's reward model (a tiny one beside the init model), its files found from the
    repository, and one group of short replies per step at a CPU-sized length."""
    section, data = config["rl"], config.get("data", {})
    args = [f"--train.micro_batch={section['num_generations']}", "--train.sequence_length=256",
            f"--train.total_batch_tokens={section['num_generations'] * 256}",
            "--rl.max_completion_tokens=8"]  # fmt: skip
    if section.get("reward_model"):
        args.append(f"--rl.reward_model={init_model.parent / 'reward-model'}")
    if section.get("reward"):
        args.append("--rl.reward=" + json.dumps([str(REPO / spec) for spec in section["reward"]]))
    if (REPO / data.get("source", "")).is_file():
        args.append(f"--data.source={REPO / data['source']}")
    return args


@pytest.mark.parametrize(("path", "auto_as"), list(dry_runs()))
def test_config_dry_run(path, auto_as, shards, init_model, hellaswag_file, tmp_path, monkeypatch,
                        capsys):  # fmt: skip
    dry_run(path, auto_as, [], shards, init_model, hellaswag_file, tmp_path, monkeypatch, capsys)


# the stages whose shipped configs use AdamW, run once with Muon (train's demo ships with it)
MUON_STAGES = [REPO / "configs" / f"{verb}-demo-cpu.toml" for verb in ("sft", "dpo", "rm", "rl")]


@pytest.mark.parametrize("path", MUON_STAGES, ids=lambda p: p.stem)
def test_every_stage_trains_and_resumes_with_muon(path, shards, init_model, hellaswag_file,
                                                  tmp_path, monkeypatch, capsys):  # fmt: skip
    extra = ["--train.optimizer=muon"]
    dry_run(path, None, extra, shards, init_model, hellaswag_file, tmp_path, monkeypatch, capsys)
    assert optimizer_name(find_resumable(tmp_path / "run")[2]["optimizer"]) == "muon"


def dry_run(path, auto_as, extra, shards, init_model, hellaswag_file, tmp_path, monkeypatch,
            capsys):  # fmt: skip
    """The config's verb for 2 steps with `extra` overrides, a resume to step 3, and checks of
    what the config switches on."""
    config = tomllib.loads(path.read_text())
    verb = verb_of(config)
    if auto_as:
        monkeypatch.setattr(policy, "auto_dtype", lambda device: AUTO_AS[auto_as])
    shipped = config.get("train", {}).get("dtype", "auto")
    dtype = str(AUTO_AS[auto_as] if auto_as else getattr(torch, shipped)).removeprefix("torch.")
    run = tmp_path / "run"
    args = [verb, str(path), "--out", str(run)]
    args += ["--init", str(init_model)] if verb != "train" else []
    args += overrides(config, verb, shards, hellaswag_file, tmp_path)
    args += rl_overrides(config, init_model) if verb == "rl" else []
    args += extra

    assert main(args) == 0
    assert f" in {dtype}," in capsys.readouterr().out  # the run announces the dtype it took
    assert main([*args, "--train.max_steps=3", "--resume", "latest"]) == 0
    assert "resuming from" in capsys.readouterr().out

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {m["step"]: m["train_loss"] for m in records if "train_loss" in m}
    assert sorted(losses) == [1, 2, 3] and np.isfinite(list(losses.values())).all()
    val_steps = [] if verb == "rl" else [0, 2, 3]  # rl holds out no prompts
    assert [m["step"] for m in records if "val_loss" in m] == val_steps
    ev = config.get("eval", {})
    expected = []
    if ev.get("sample_tokens", 32) > 0 and ev.get("sample_prompts", [None]):
        expected.append("samples" if verb == "train" else "chat_samples")
    if verb == "train" and ev.get("hellaswag_every", 0) > 0:
        expected.append("hellaswag_acc_norm")
    if verb == "train":
        expected += [f"{name}_acc_norm" for name in scheduled_tasks(ev)]
    if verb == "train" and ev.get("tasks_every", 0) > 0:
        expected.append("tasks_core")
    if verb == "dpo":
        expected.append("eval_rewards/accuracies")
    if verb == "rm":
        expected.append("eval_accuracy")
    if verb == "rl":
        assert [m["step"] for m in records if "reward" in m] == [1, 2, 3]
    for key in expected:
        assert [m["step"] for m in records if key in m] == [0, 2, 3], key
    for step in (2, 3):
        assert (run / "checkpoints" / f"step_{step:07d}" / WEIGHTS).is_file()
    state = find_resumable(run)[2]  # fp16 trains with a GradScaler, whose state resumes too
    assert bool(state["scaler"]) == (dtype == "float16")
