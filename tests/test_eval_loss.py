"""Validation loss / perplexity on shard datasets, and the `minigpt eval` command line."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_hellaswag import official_rows, write_jsonl

from minigpt.checkpoints import save_model
from minigpt.data.shards import ShardError, write_shard
from minigpt.evals.hellaswag import evaluate, load_examples
from minigpt.evals.loss import evaluate_loss
from minigpt.model import GPT

from conftest import SRC, tiny_config

SEQ = 16


@pytest.fixture
def val_tokens():
    rng = np.random.default_rng(0)
    return rng.integers(0, 50257, size=150).astype(np.uint16)


@pytest.fixture
def shard_dir(tmp_path, val_tokens):
    """A val split spread over two shards (100 + 50 tokens), plus a train shard to ignore."""
    write_shard(tmp_path / "toy_val_000000.bin", val_tokens[:100])
    write_shard(tmp_path / "toy_val_000001.bin", val_tokens[100:])
    write_shard(tmp_path / "toy_train_000000.bin", np.zeros(500, dtype=np.uint16))
    return tmp_path


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(tiny_config())


def reference_loss(model: GPT, tokens: np.ndarray, n_windows: int) -> float:
    """Mean next-token cross-entropy over `n_windows` consecutive windows, one at a time."""
    losses = []
    with torch.no_grad():
        for w in range(n_windows):
            window = torch.tensor(tokens[w * SEQ : w * SEQ + SEQ + 1].astype(np.int64))
            logits, _ = model(window[None, :-1])
            losses.append(F.cross_entropy(logits[0], window[1:], reduction="none"))
    return torch.cat(losses).mean().item()


def test_loss_matches_reference_across_shards(model, shard_dir, val_tokens):
    # 130 tokens -> 8 windows of 16; the 8th reads the second shard
    result = evaluate_loss(model, shard_dir, tokens=130, batch_size=3, seq_len=SEQ)
    assert result["tokens"] == 8 * SEQ
    assert result["loss"] == pytest.approx(reference_loss(model, val_tokens, 8), abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_budget_larger_than_val_split_uses_what_there_is(model, shard_dir, val_tokens):
    result = evaluate_loss(model, shard_dir, tokens=10_000, seq_len=SEQ)
    assert result["tokens"] == (len(val_tokens) - 1) // SEQ * SEQ


def test_too_little_validation_data(model, tmp_path):
    write_shard(tmp_path / "toy_val_000000.bin", np.arange(10, dtype=np.uint16))
    with pytest.raises(ShardError, match="fewer than one sequence"):
        evaluate_loss(model, tmp_path, tokens=100, seq_len=SEQ)
    with pytest.raises(ShardError, match="no such dataset directory"):
        evaluate_loss(model, tmp_path / "nowhere", tokens=100, seq_len=SEQ)


def test_cli_eval_loss(model, shard_dir, tmp_path, cli):
    save_model(tmp_path / "ckpt", model, step=0)
    result = cli(
        "eval", "loss", "--model", tmp_path / "ckpt", "--data", shard_dir, "--tokens", "64"
    )
    loss = float(re.search(r"val loss (\S+)", result.stdout).group(1))
    # the CLI uses the model's whole context (64), so the budget is one window
    assert loss == pytest.approx(evaluate_loss(model, shard_dir, tokens=64)["loss"], abs=1e-4)


def test_cli_eval_hellaswag_with_output(model, tmp_path, cli):
    save_model(tmp_path / "ckpt", model, step=0)
    data = tmp_path / "hellaswag_val.jsonl"
    write_jsonl(data, official_rows(10))
    out = tmp_path / "predictions.jsonl"
    result = cli(
        "eval", "hellaswag", "--model", tmp_path / "ckpt", "--data", data, "--limit", "6",
        "--batch-size", "4", "--output", out,
    )  # fmt: skip
    expected = evaluate(model, load_examples(data), "cpu", limit=6)
    assert f"acc {expected['acc']:.4f}  acc_norm {expected['acc_norm']:.4f}" in result.stdout
    assert "n 6  (" in result.stdout and "examples/s" in result.stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [1000 + i for i in range(6)]
    assert set(lines[0]) == {
        "id", "gold", "pred", "pred_norm", "pred_per_token", "logprobs", "tokens"
    }  # fmt: skip


def test_eval_and_export_help_do_not_import_torch():
    code = (
        "import sys\nfrom minigpt.cli import build_parser\n"
        "for verb in (['eval', 'loss'], ['eval', 'hellaswag'], ['eval', 'suite'], ['eval', 'harness'], ['export', 'hf']):\n"
        "    try:\n        build_parser().parse_args([*verb, '--help'])\n"
        "    except SystemExit:\n        pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(SRC)})
