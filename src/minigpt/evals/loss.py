"""Validation loss and perplexity on a fixed token budget of a shard dataset's val split.

The val split is read as one stream from its first token and cut into consecutive windows of
`seq_len` inputs (each target is the next token), exactly how the training loader reads it, so the
number is comparable with the `val_loss` a training run logs. The budget is rounded down to whole
windows; the loss is the mean cross-entropy over every predicted token, as `GPT.forward` computes
it (over the model's full, padded vocabulary), and perplexity is its exponential. On CUDA the
forward runs under bf16 autocast (as training does) and the sum stays on the device until the end.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from minigpt.data.shards import ShardError, list_shards, read_shard
from minigpt.device import inference_autocast
from minigpt.evals.scoring import to_device
from minigpt.model import GPT


@torch.no_grad()
def evaluate_loss(
    model: GPT,
    data_dir: str | os.PathLike,
    tokens: int = 2**20,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    seq_len: int | None = None,
) -> dict:
    """{"loss", "perplexity", "tokens"} over the first `tokens` predictions of the val split."""
    seq_len = seq_len or model.config.block_size
    windows = _windows(data_dir, tokens, seq_len)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no syncs
    try:
        with inference_autocast(model, device):
            for start in range(0, len(windows), batch_size):
                chunk = windows[start : start + batch_size]
                inputs, targets = (
                    to_device(torch.from_numpy(a.copy()), device)
                    for a in (chunk[:, :-1], chunk[:, 1:])
                )
                _, loss = model(inputs, targets)
                total += loss.double() * targets.numel()
    finally:
        model.train(was_training)
    count = windows.shape[0] * seq_len
    mean = total.item() / count
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": count}


def _windows(data_dir: str | os.PathLike, tokens: int, seq_len: int) -> np.ndarray:
    """(n, seq_len + 1) int64 windows overlapping by one token, from the val split's start."""
    if tokens < seq_len:
        raise ShardError(f"a budget of {tokens} tokens is less than one sequence ({seq_len})")
    wanted = tokens // seq_len * seq_len + 1
    stream = _first_tokens(list_shards(data_dir, "val"), wanted)
    n = (len(stream) - 1) // seq_len
    if n == 0:
        raise ShardError(
            f"{data_dir}: the val split has {len(stream)} tokens, fewer than one sequence of "
            f"{seq_len + 1}; prepare more validation data or pass a shorter sequence length"
        )
    starts = np.arange(n)[:, None] * seq_len
    return stream[starts + np.arange(seq_len + 1)]


def _first_tokens(paths: list, count: int) -> np.ndarray:
    parts, have = [], 0
    for path in paths:
        if have >= count:
            break
        part = np.asarray(read_shard(path)[: count - have], dtype=np.int64)
        parts.append(part)
        have += len(part)
    return np.concatenate(parts)
