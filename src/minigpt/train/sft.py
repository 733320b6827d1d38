"""Supervised fine-tuning wiring: conversations become padded batches for the same Trainer.

`sft(config, run_dir, resume_from, init)` is what `minigpt sft` runs, on one process or on every
process that torchrun starts. The model starts from `init` (a minigpt run or checkpoint directory,
or a Hugging Face GPT-2 directory, whose importer already starts the chat-token rows at the mean
embedding); conversations from `config.data` are rendered with the chat template, the last
`data.val_fraction` of them held out for validation loss, and the rest served as micro-batches of
whole conversations, right-padded to the longest in the batch, with the loss only on assistant
tokens and their closing `<|END|>` (see `minigpt.data.chat.collate_sft`). Under `train.compile`
training batches are padded further, to one of `finetune.batch_lengths(train)`, so the compiled
forward meets a few fixed shapes (one graph each) instead of one per conversation length.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from minigpt.config import RunConfig
from minigpt.data.chat import collate_sft, load_conversations, render_for_sft
from minigpt.errors import MinigptError
from minigpt.tokenizer import Tokenizer, get_tokenizer
from minigpt.train.distributed import DistContext
from minigpt.train.finetune import (
    INIT_NOTE,
    ConversationBatches,
    Example,
    batch_lengths,
    chat_hook,
    init_model,
    split_conversations,
)
from minigpt.train.run import StageParts, run_training


class ConversationEval:
    """Held-out conversations as fixed batches: rank r of `world_size` evaluates examples r,
    r + world_size, ...; `batches()` yields the same batches on every call, each as long as its
    longest example (evaluation runs the uncompiled model: bucketing would only add padding)."""

    def __init__(
        self,
        examples: Sequence[Example],
        micro_batch: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.examples = list(examples)[rank::world_size]
        self.micro_batch, self.pad_id = micro_batch, pad_id

    def batches(self):
        for start in range(0, len(self.examples), self.micro_batch):
            yield collate_sft(self.examples[start : start + self.micro_batch], self.pad_id)


def load_examples(
    config: RunConfig, tokenizer: Tokenizer, verbose: bool = True
) -> tuple[list[Example], list[Example]]:
    """Rendered (train, val) examples from `config.data`, each at most sequence_length + 1
    tokens; what loading and truncation cost is printed when `verbose`."""
    data = config.data
    if not data.source:
        raise MinigptError("data.source is not set: a hub name, a .json/.jsonl file or chitchat")
    loaded = load_conversations(
        data.source, data.format or None, split=data.split, limit=data.limit or None
    ).require_some()
    train, val = split_conversations(loaded.conversations, data.val_fraction)
    max_tokens = config.train.sequence_length + 1
    train_examples, stats = render_for_sft(train, tokenizer, max_tokens)
    val_examples, _ = render_for_sft(val, tokenizer, max_tokens)
    if verbose:
        print(
            f"{loaded.summary()}; {len(train_examples)} train / {len(val_examples)} val examples; "
            f"{stats.truncated} truncated to {max_tokens} tokens, {stats.left_out} left out",
            flush=True,
        )
    return train_examples, val_examples


def build_data(
    config: RunConfig, tokenizer: Tokenizer, dist: DistContext
) -> tuple[ConversationBatches, ConversationEval | None]:
    """This rank's training batch source and validation data (None when nothing is held out)."""
    cfg, pad = config.train, tokenizer.eot_id
    train, val = load_examples(config, tokenizer, dist.is_main)
    batches = ConversationBatches(
        train, cfg.micro_batch, cfg.seed, pad, dist.rank, dist.world_size, batch_lengths(cfg)
    )
    if not val:
        return batches, None
    return batches, ConversationEval(val, cfg.micro_batch, pad, dist.rank, dist.world_size)


def sft(
    config: RunConfig,
    run_dir: str | Path,
    resume_from: str | Path | None = None,
    init: str | Path | None = None,
    dist: DistContext | None = None,
) -> Path:
    """Fine-tune `init` on `config.data`'s conversations into `run_dir`, continuing from
    `resume_from` (a run or checkpoint directory) when given, in which case `init` defaults to
    it. Returns the run directory."""
    init = init if init is not None else resume_from
    if init is None:
        raise MinigptError("minigpt sft needs --init MODEL (a run, checkpoint or HF GPT-2 dir)")

    def setup(dist: DistContext) -> StageParts:
        model = init_model(init, config.train.sequence_length)
        torch.manual_seed(config.train.seed + dist.rank)  # different dropout masks per rank
        tokenizer = get_tokenizer()
        batches, val = build_data(config, tokenizer, dist)
        hooks = [chat_hook(config, tokenizer)] if config.eval.sample_tokens > 0 else []
        return StageParts(model, batches, val, hooks)

    notes = {INIT_NOTE: f"{init}\n"}  # where the weights came from (written on a fresh start)
    return run_training(config, run_dir, resume_from, dist, setup, notes)
