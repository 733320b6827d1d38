"""Online RL against independent references: advantages and losses computed by hand on fixed
tensors, the first update's ratio and KL, a synthetic reward a tiny model learns, bad rewards."""

from __future__ import annotations

import json
import math

import pytest
import torch

from minigpt.checkpoints import save_model
from minigpt.config import RLSection, load_config
from minigpt.errors import MinigptError
from minigpt.model import GPT
from minigpt.reward import RewardModel
from minigpt.train.rl import (
    PolicyObjective,
    RewardError,
    check_rl_section,
    group_advantages,
    policy_loss,
    rl,
    token_logps,
)

from conftest import tiny_config

# share of completion ids below 25,000: about 0.5 for a random model, learnable under top-k
LOW_IDS = """
def low_ids(prompts, completions, completion_ids, finish_reasons, answer, **kwargs):
    assert len(answer) == len(completions) == len(finish_reasons) == len(prompts)
    assert set(finish_reasons) <= {"stop", "length"}
    return [sum(t < 25000 for t in ids) / max(1, len(ids)) for ids in completion_ids]
"""
BAD = {
    "raises": "def f(prompts, completions, **kw):\n    raise ValueError('boom')\n",
    "count": "def f(prompts, completions, **kw):\n    return [1.0]\n",
    "nan": "def f(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n",
}


def test_grpo_and_rloo_advantages_match_hand_computed_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    std = math.sqrt((4 * 0.25) / 3)  # the sample std of (1, 0, 0, 1)
    grpo = group_advantages(rewards, "grpo")
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4]) / torch.tensor(
        [[std + 1e-4], [1e-4]]
    )
    torch.testing.assert_close(grpo, expected)
    # leave one out: reward 1 against the mean of (0, 0, 1), reward 0 against (1, 0, 1)
    rloo = group_advantages(rewards, "rloo")
    torch.testing.assert_close(rloo[0], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    torch.testing.assert_close(rloo[1], torch.zeros(4))


def test_clipped_loss_and_kl_match_hand_computed_values():
    logps = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    old = torch.log(torch.tensor([[0.25, 0.2, 0.5]]))  # ratios 2, 1, 1.8
    ref = torch.log(torch.tensor([[0.5, 0.1, 0.9]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    total, sums = policy_loss(logps, old, ref, torch.tensor([1.0]), mask, epsilon=0.2, beta=0.1)
    # token 1: min(2 * 1, 1.2 * 1) = 1.2; token 2: ratio 1 -> 1; kl: 0, and 0.5 - ln 0.5 - 1
    kl = 0.5 - math.log(0.5) - 1
    assert total.item() == pytest.approx(-1.2 - 1.0 + 0.1 * kl, abs=1e-6)
    assert sums["kl"].item() == pytest.approx(kl, abs=1e-6)
    assert sums["clip_ratio/high_mean"].item() == 1.0  # token 1 clipped above, A > 0
    assert sums["clip_ratio/low_mean"].item() == 0.0
    # a negative advantage: min(-2, -1.2) = -2 (unclipped, the pessimistic side)
    total, sums = policy_loss(logps, old, None, torch.tensor([-1.0]), mask, 0.2, 0.1)
    assert total.item() == pytest.approx(2.0 + 1.0, abs=1e-6)
    assert "kl" not in sums and sums["clip_ratio/region_mean"].item() == 0.0


def test_first_update_has_ratio_one_and_zero_kl(one_thread):
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    inputs = torch.randint(0, 1000, (2, 6))
    targets = inputs.roll(-1, 1)
    targets[:, :3] = -100  # the prompt
    with torch.no_grad():
        ref = token_logps(model(inputs)[0], targets)[0]
    advantages = torch.tensor([1.0, -1.0])
    objective = PolicyObjective(RLSection(beta=0.1))
    loss, sums = objective(model, (inputs, targets, advantages, ref, torch.empty(0)))
    assert sums["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert sums["clip_ratio/region_mean"].item() == 0.0
    # ratio 1: the loss is -mean(A) over the completion tokens (3 of each row: equal shares)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()  # the gradient is the policy gradient: it moves the weights
    assert model.transformer.wte.weight.grad.abs().sum() > 0


def _setup(tmp_path, reward_source=LOW_IDS, **overrides):
    torch.manual_seed(0)
    save_model(tmp_path / "init", GPT(tiny_config()))
    prompts = tmp_path / "prompts.jsonl"
    with prompts.open("w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"Say something about {i}.", "answer": str(i)}) + "\n")
    (tmp_path / "rewards.py").write_text(reward_source)
    name = "low_ids" if reward_source == LOW_IDS else "f"
    settings = {
        "data.source": str(prompts), "data.val_fraction": "0",
        "train.max_steps": "12", "train.micro_batch": "16", "train.sequence_length": "32",
        "train.total_batch_tokens": "512", "train.max_lr": "1e-2", "train.min_lr": "1e-2",
        "train.warmup_steps": "1", "train.device": "cpu", "train.dtype": "float32",
        "train.eval_every": "12", "train.checkpoint_every": "100", "eval.sample_tokens": "0",
        "log.progress": "false", "log.tensorboard": "false",
        "rl.reward": f'["{tmp_path / "rewards.py"}:{name}"]', "rl.max_completion_tokens": "8",
        "rl.top_k": "4", "rl.num_generations": "4", "rl.beta": "0.04", **overrides,
    }  # fmt: skip
    return load_config(None, settings)


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_mean_reward_rises_on_a_synthetic_reward_with_trl_metrics(tmp_path, one_thread):
    run = rl(_setup(tmp_path), tmp_path / "run", init=tmp_path / "init")
    lines = _metrics(run)
    steps = [x for x in lines if "reward" in x]
    assert len(steps) == 12
    names = {
        "reward", "reward_std", "rewards/low_ids/mean", "rewards/low_ids/std", "kl", "entropy",
        "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio",
        "frac_reward_zero_std",
    }  # fmt: skip
    assert names <= set(steps[0])
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # the policy is the reference
    first, last = steps[0]["reward"], sum(x["reward"] for x in steps[-4:]) / 4
    assert last - first >= 0.3, (first, last)
    assert 0 < max(x["kl"] for x in steps) < 5  # the leash holds
    assert any("completions" in x for x in lines)  # samples at the eval


@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_bad_reward_function_is_named_with_the_prompt_before_any_update(tmp_path, bad):
    config = _setup(tmp_path, BAD[bad])
    message = {
        "raises": "raised ValueError",
        "count": "returned 1 values for 4",
        "nan": "returned a non-finite",
    }
    with pytest.raises(RewardError, match=rf"reward function f on prompt \d+ {message[bad]}"):
        rl(config, tmp_path / "run", init=tmp_path / "init")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert all("train_loss" not in x for x in _metrics(tmp_path / "run"))


def test_an_unimportable_reward_function_is_refused_at_start(tmp_path):
    config = _setup(tmp_path, **{"rl.reward": '["no_such_module_xyz:f"]'})
    with pytest.raises(RewardError, match="no_such_module_xyz:f.*cannot import"):
        rl(config, tmp_path / "run", init=tmp_path / "init")
    config = _setup(tmp_path, **{"rl.reward": f'["{tmp_path / "rewards.py"}:missing"]'})
    with pytest.raises(RewardError, match="has no function missing"):
        rl(config, tmp_path / "run", init=tmp_path / "init")


def test_a_reward_model_of_another_vocabulary_is_refused_at_start(tmp_path):
    config = _setup(tmp_path, **{"rl.reward_model": str(tmp_path / "rm")})
    torch.manual_seed(1)
    save_model(tmp_path / "rm", RewardModel(tiny_config(vocab_size=1024)))
    with pytest.raises(RewardError, match="vocabulary of 1024 ids"):
        rl(config, tmp_path / "run", init=tmp_path / "init")
    with pytest.raises(RewardError, match="a language model, where a reward model"):
        rl(
            _setup(tmp_path, **{"rl.reward_model": str(tmp_path / "init")}),
            tmp_path / "run2",
            init=tmp_path / "init",
        )


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("loss_type", "ppo", "rl.loss_type"),
        ("num_generations", 1, "rl.num_generations"),
        ("epsilon", 0.0, "rl.epsilon"),
        ("reward_weights", [1.0, 2.0], "rl.reward_weights"),
    ],
)
def test_bad_rl_settings_are_refused_with_the_key(key, value, match):
    section = RLSection(reward=["m:f"], **{key: value})
    with pytest.raises(MinigptError, match=match):
        check_rl_section(section)


def _cli_settings(config):
    """A config as command-line overrides of the verifiable demo's file."""
    from dataclasses import asdict

    keys = (
        "data.source",
        "data.format",
        "data.val_fraction",
        "rl.reward",
        "rl.max_completion_tokens",
    )
    keys += (
        "rl.top_k",
        "rl.num_generations",
        "rl.num_iterations",
        "rl.beta",
        "train.sequence_length",
    )
    keys += ("train.max_lr", "train.min_lr", "train.warmup_steps", "train.max_steps")
    keys += ("train.total_batch_tokens", "train.checkpoint_every", "train.eval_every")
    out = []
    for key in keys:
        section, name = key.split(".")
        value = asdict(getattr(config, section))[name]
        out.append(f"--{key}={json.dumps(value) if isinstance(value, list) else value}")
    return out + ["--eval.sample_tokens=0", "--log.progress=false"]


def test_resume_is_exact_and_two_gloo_processes_match_one(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO, SRC, run_minigpt

    # two updates per rollout batch: the stop after step 1 is in mid-batch
    config = _setup(
        tmp_path,
        **{"train.max_steps": "4", "train.checkpoint_every": "2", "rl.num_iterations": "2"},
    )
    config.data.format = "prompts"
    args = ["rl", REPO / "configs" / "rl-verifiable-demo-cpu.toml", "--init", tmp_path / "init"]
    settings, env = _cli_settings(config), {"OMP_NUM_THREADS": "1"}
    run_minigpt(*args, "--out", tmp_path / "one", *settings, "--train.micro_batch=16", env=env)
    # stopped after step 1, resumed to 4
    part = [s for s in settings if not s.startswith("--train.max_steps")]
    run_minigpt(*args, "--out", tmp_path / "resumed", *part, "--train.max_steps=1",
                "--train.micro_batch=16", env=env)  # fmt: skip
    run_minigpt(*args, "--out", tmp_path / "resumed", "--resume", "latest", *settings,
                "--train.micro_batch=16", env=env)  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*cmd, "-m", "minigpt", *map(str, args), "--out", str(tmp_path / "ddp"), *settings,
         "--train.micro_batch=8"],
        env={**os.environ, **env, "PYTHONPATH": str(SRC)}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout

    def series(run, key):
        return [(x["step"], x[key]) for x in _metrics(run) if key in x]

    for key in ("reward", "train_loss", "kl", "clip_ratio/region_mean", "completions/mean_length"):
        one = series(tmp_path / "one", key)
        assert len(one) == 4
        assert series(tmp_path / "resumed", key) == one  # exact
        for (s1, a), (s2, b) in zip(one, series(tmp_path / "ddp", key), strict=True):
            assert s1 == s2 and a == pytest.approx(b, abs=1e-4), key


def test_plot_draws_reward_and_kl_panels_for_rl_runs():
    from minigpt.train.plot import panels

    records = [{"step": s, "train_loss": 0.1, "reward": 0.1 * s, "kl": 0.01 * s} for s in (1, 2)]
    titles = [panel[0] for panel in panels({"rl": records})]
    assert titles == ["loss", "RL reward", "RL KL to the start"]


def test_a_reward_model_scores_whole_sequences_at_the_full_context(tmp_path, one_thread):
    """Prompts long enough that prompt + completion fill the context the reward model reads."""
    config = _setup(
        tmp_path,
        **{"rl.reward_model": str(tmp_path / "rm"), "rl.reward_weights": "[0.5, 1.0]",
           "train.sequence_length": "64", "train.total_batch_tokens": "1024", "train.max_steps": "2"},
    )  # fmt: skip
    with (tmp_path / "prompts.jsonl").open("w") as f:  # rendered: 56 tokens (fit), 57 (not)
        for i in range(16):
            f.write(json.dumps({"prompt": "word " * (52 + i % 2) + str(i % 10), "answer": "x"}))
            f.write("\n")
    torch.manual_seed(1)
    save_model(tmp_path / "rm", RewardModel(tiny_config()))
    run = rl(config, tmp_path / "run", init=tmp_path / "init")
    steps = [x for x in _metrics(run) if "reward" in x]
    assert len(steps) == 2
    for x in steps:  # the weighted sum of the two rewards' means
        mixed = 0.5 * x["rewards/reward_model/mean"] + x["rewards/low_ids/mean"]
        assert x["reward"] == pytest.approx(mixed, abs=1e-6)


def test_compiled_rl_trains_as_eager_in_at_most_one_graph_per_bucket(
    tmp_path, counted_compile, one_thread
):
    """`train.compile` on the RL stage: the policy's training forward goes through dynamo (the
    counting backend runs its graphs eagerly), within one graph per length bucket, and the run's
    numbers are those of the eager run."""
    from minigpt.data.chat import length_buckets

    runs = {}
    for compiled in ("false", "true"):
        config = _setup(tmp_path, **{"train.max_steps": "3", "train.compile": compiled})
        runs[compiled] = _metrics(rl(config, tmp_path / f"run-{compiled}", init=tmp_path / "init"))
    assert 1 <= counted_compile.frame_count <= len(length_buckets(config.train.sequence_length))
    for key in ("train_loss", "reward", "kl"):
        eager = [x[key] for x in runs["false"] if key in x]
        assert len(eager) == 3
        assert [x[key] for x in runs["true"] if key in x] == pytest.approx(eager, abs=1e-6), key
