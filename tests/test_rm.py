"""Reward models against independent references: hand-computed Bradley-Terry numbers, a row scored
alone for padding, transformers' GPT2ForSequenceClassification for export, the CLI end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from minigpt.checkpoints import CheckpointError, load_model, save_model
from minigpt.config import RMSection
from minigpt.data.preference import PreferencePair, render_pairs
from minigpt.errors import MinigptError
from minigpt.model import GPT
from minigpt.reward import RewardModel, collate_sequences
from minigpt.tokenizer import get_tokenizer
from minigpt.train.rm import (
    RewardObjective,
    check_rm_section,
    collate_reward_pairs,
    reward_metrics,
)

from conftest import REPO, free_port, run_minigpt, tiny_config


def _reward_model(seed=0):
    torch.manual_seed(seed)
    return RewardModel.from_language_model(GPT(tiny_config())).eval()


def test_loss_accuracy_and_margin_match_hand_computed_values():
    chosen, rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    # -log sigmoid(1) = log(1 + e^-1), -log sigmoid(-1) = log(1 + e)
    loss = (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2
    metrics = reward_metrics(chosen, rejected)
    assert metrics["loss"] == pytest.approx(loss, abs=1e-6)
    assert metrics["accuracy"] == 0.5
    assert metrics["margin"] == pytest.approx(0.0)
    assert metrics["mean_reward"] == pytest.approx(0.25)
    assert (metrics["min_reward"], metrics["max_reward"]) == (-0.5, 1.0)
    # centring adds coefficient * mean((r_c + r_r)^2) = 0.01 * (1 + 0) / 2
    centred = reward_metrics(chosen, rejected, 0.01)["loss"]
    assert centred == pytest.approx(loss + 0.005, abs=1e-6)
    # the training objective: the same loss, sums per pair for the trainer
    objective = RewardObjective(RMSection(center_rewards_coefficient=0.01))
    batch = (torch.zeros(4, 3, dtype=torch.long), torch.tensor([1, 1, 1, 1]))
    value, sums = objective(lambda ids, lengths: torch.cat([chosen, rejected]), batch)
    assert value.item() == pytest.approx(loss + 0.005, abs=1e-6)
    assert objective.count(batch) == 2
    assert {k: v.item() for k, v in sums.items()} == pytest.approx(
        {"accuracy": 1.0, "margin": 0.0, "mean_reward": 0.5, "min_reward": -0.5, "max_reward": 1.0}
    )


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(one_thread):
    model = _reward_model()
    short, long = [5, 6, 7], [8, 9, 10, 11, 12, 13]
    ids, lengths = collate_sequences([short, long], pad_id=50256)
    padded = model(ids, lengths)
    alone = model(torch.tensor([short]), torch.tensor([3]))
    assert padded[0].item() == pytest.approx(alone.item(), abs=1e-5)
    # the head reads the final hidden state of that token, by hand
    hidden = model.hidden_states(torch.tensor([long]))[0, -1]
    assert padded[1].item() == pytest.approx((hidden @ model.score.weight[0]).item(), abs=1e-5)


def test_bad_center_coefficient_is_refused():
    with pytest.raises(MinigptError, match="rm.center_rewards_coefficient"):
        check_rm_section(RMSection(center_rewards_coefficient=-1.0))


def test_reward_checkpoint_round_trips_and_is_refused_where_a_language_model_is_needed(tmp_path):
    model = _reward_model()
    save_model(tmp_path / "rm", model)
    loaded = load_model(tmp_path / "rm", head="reward")
    assert isinstance(loaded, RewardModel)
    assert torch.equal(loaded.score.weight, model.score.weight)
    with pytest.raises(CheckpointError, match="a reward model"):
        load_model(tmp_path / "rm")


def test_exported_reward_model_scores_the_same_in_transformers(tmp_path, one_thread):
    transformers = pytest.importorskip("transformers")
    from minigpt.interop.hf import export_hf

    model = _reward_model(seed=3)
    export_hf(model, tmp_path / "hf")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert type(theirs).__name__ == "GPT2ForSequenceClassification"
    pairs = [PreferencePair([{"role": "user", "content": "Hi there."}], "Hello, friend!", "No.")]
    (pair,), _ = render_pairs(pairs, get_tokenizer(), 64)
    ids, lengths = collate_reward_pairs([pair], get_tokenizer().eot_id)
    ours = model(ids, lengths)
    with torch.no_grad():
        logits = theirs(input_ids=ids).logits.squeeze(-1)  # padded with <|endoftext|>
    torch.testing.assert_close(logits, ours, atol=1e-4, rtol=0)


def test_cli_rm_logs_trl_metrics_scores_pairs_and_exports(tmp_path):
    torch.manual_seed(0)
    save_model(tmp_path / "init", GPT(tiny_config()))
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as f:
        for i in range(24):
            record = {"prompt": f"Question {i}?", "chosen": "Yes, gladly.", "rejected": "no"}
            f.write(json.dumps(record) + "\n")
    run = tmp_path / "rm"
    run_minigpt(
        "rm", REPO / "configs" / "rm-demo-cpu.toml", "--init", tmp_path / "init", "--out", run,
        f"--data.source={pairs}", "--data.format=trl", "--data.val_fraction=0.25", "--data.limit=0",
        "--train.max_steps=6", "--train.micro_batch=4", "--train.sequence_length=32",
        "--train.total_batch_tokens=128", "--train.max_lr=3e-3", "--train.warmup_steps=1",
        "--train.eval_every=6", "--train.device=cpu", "--train.dtype=float32",
        "--eval.sample_tokens=0", "--log.tensorboard=false", "--log.progress=false",
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "train_loss" in x]
    evals = [x for x in lines if "eval_accuracy" in x]
    assert {"accuracy", "margin", "mean_reward", "min_reward", "max_reward"} <= set(train[-1])
    assert all(x["min_reward"] <= x["mean_reward"] <= x["max_reward"] for x in train)
    assert {"val_loss", "eval_margin", "eval_mean_reward", "eval_min_reward"} <= set(evals[-1])
    assert evals[-1]["eval_accuracy"] == 1.0  # the chosen reply is always the same longer one
    scored = run_minigpt("eval", "reward", "--model", run, "--data", pairs, "--format", "trl")
    assert "24 pairs: accuracy 1.0000" in scored.stdout
    run_minigpt("export", "hf", run, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert config["num_labels"] == 1


def _extremes_on_rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from minigpt.train.distributed import DistContext
    from minigpt.train.trainer import _reduce_extremes

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mine = {"min_reward": torch.tensor([3.0, -2.0][rank]), "max_reward": torch.tensor(rank)}
        results[rank] = _reduce_extremes(mine, DistContext(rank=rank, world_size=2))
    finally:
        dist.destroy_process_group()


def test_train_min_and_max_reward_are_the_steps_extremes_over_micro_batches_and_ranks():
    from minigpt.train.trainer import _combine

    # micro-batches: extremes by min / max, every other metric summed
    assert _combine("min_reward", torch.tensor(0.5), torch.tensor(-1.0)).item() == -1.0
    assert _combine("max_reward", torch.tensor(0.5), torch.tensor(-1.0)).item() == 0.5
    assert _combine("margin", torch.tensor(0.5), torch.tensor(-1.0)).item() == -0.5
    # ranks: rank 0 saw [3, 0], rank 1 [-2, 1]; both log min -2, max 1
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_extremes_on_rank, args=(free_port(), results), nprocs=2)
    assert dict(results) == {r: {"min_reward": -2.0, "max_reward": 1.0} for r in (0, 1)}


def test_compiled_rm_trains_as_eager_in_at_most_one_graph_per_bucket(
    tmp_path, counted_compile, one_thread
):
    """`train.compile` on the reward-model stage: pairs of varied lengths go through dynamo (the
    counting backend runs its graphs eagerly) within one graph per length bucket, and the losses
    are those of the eager run."""
    from minigpt.config import load_config
    from minigpt.data.chat import length_buckets
    from minigpt.train.rm import rm

    torch.manual_seed(0)
    save_model(tmp_path / "init", GPT(tiny_config()))
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as f:
        for i in range(16):
            n = [1, 9, 3, 14, 6, 11, 2, 8][i % 8]
            f.write(json.dumps({"prompt": f"Q{i}?", "chosen": "yes " * n, "rejected": "no"}) + "\n")
    runs = {}
    for compiled in ("false", "true"):
        overrides = {
            "data.source": str(pairs), "data.format": "trl", "data.val_fraction": "0",
            "data.limit": "0", "train.compile": compiled, "train.max_steps": "4",
            "train.micro_batch": "2", "train.sequence_length": "32",
            "train.total_batch_tokens": "64", "train.device": "cpu", "train.dtype": "float32",
            "train.eval_every": "100", "train.checkpoint_every": "100",
            "eval.sample_tokens": "0", "log.tensorboard": "false", "log.progress": "false",
        }  # fmt: skip
        config = load_config(REPO / "configs" / "rm-demo-cpu.toml", overrides)
        run = rm(config, tmp_path / f"run-{compiled}", init=tmp_path / "init")
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        runs[compiled] = [x["train_loss"] for x in lines if "train_loss" in x]
    assert 1 <= counted_compile.frame_count <= len(length_buckets(32))
    assert len(runs["false"]) == 4 and runs["true"] == pytest.approx(runs["false"], abs=1e-6)
