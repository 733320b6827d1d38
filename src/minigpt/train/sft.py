"""Supervised fine-tuning wiring: conversations become padded batches for the same Trainer.

`sft(config, run_dir, resume_from, init)` is what `minigpt sft` runs, on one process or on every
process that torchrun starts. The model starts from `init` (a minigpt run or checkpoint directory,
or a Hugging Face GPT-2 directory, whose importer already starts the chat-token rows at the mean
embedding); conversations from `config.data` are rendered with the chat template, the last
`data.val_fraction` of them held out for validation loss, and the rest served as micro-batches of
whole conversations, right-padded to the longest in the batch, with the loss only on assistant
tokens and their closing `<|END|>` (see `minigpt.data.chat.collate_sft`). Under `train.compile`
training batches are padded further, to one of `batch_lengths(train)`, so the compiled forward
meets a few fixed shapes (one graph each) instead of one per conversation length.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from minigpt.checkpoints import load_model
from minigpt.config import RunConfig, TrainSection
from minigpt.data.chat import (
    Conversation,
    collate_sft,
    length_buckets,
    load_conversations,
    render_for_sft,
)
from minigpt.errors import MinigptError
from minigpt.model import GPT
from minigpt.tokenizer import Tokenizer, get_tokenizer
from minigpt.train.distributed import DistContext
from minigpt.train.pretrain import run_training
from minigpt.train.trainer import EvalHook

Example = tuple[list[int], list[int]]  # rendered (ids, mask)


def batch_lengths(train: TrainSection) -> tuple[int, ...]:
    """The lengths SFT and DPO pad training batches to: with `train.compile`, the buckets of
    `length_buckets(sequence_length)` (no batch is longer: examples are cut to it); without,
    none (each batch as long as its longest example)."""
    return length_buckets(train.sequence_length) if train.compile else ()


class ConversationBatches:
    """Training micro-batches of whole rendered conversations: a seeded, resumable stream.

    Every epoch visits the examples in a fresh order drawn from (seed, epoch); the stream is a
    function of (seed, epoch, position) alone, so `state_dict()` is plain integers and a source
    restored from it yields exactly the batches the original would have. Under data parallelism
    each `next_batch` consumes `world_size * micro_batch` examples and rank r keeps the r-th
    slice, so ranks read disjoint conversations (as TokenLoader does with token windows).
    Batches are padded to the smallest of `buckets` that holds them (see `collate_sft`). Every
    batch has `micro_batch` rows (the stream runs on across epochs), so under torch.compile only
    its length varies, and only over `buckets`.
    """

    ignores_targets = True  # prompts and padding are -100: counts differ by batch and rank

    def __init__(
        self,
        examples: Sequence[Example],
        micro_batch: int,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        buckets: Sequence[int] = (),
    ):
        if not examples:
            raise MinigptError("no training conversations left after the validation split")
        self.examples, self.micro_batch, self.seed, self.pad_id = (
            examples,
            micro_batch,
            seed,
            pad_id,
        )
        self.rank, self.world_size, self.buckets = rank, world_size, buckets
        self.epoch = self.pos = 0
        self._plan()

    def _plan(self) -> None:
        self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))

    def _take(self) -> int:
        index = int(self._order[self.pos])
        self.pos += 1
        if self.pos == len(self.examples):
            self.epoch, self.pos = self.epoch + 1, 0
            self._plan()
        return index

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) int64 (micro_batch, T) for this rank; targets -100 where ignored."""
        first = self.rank * self.micro_batch
        picked = [self._take() for _ in range(self.world_size * self.micro_batch)]
        mine = picked[first : first + self.micro_batch]
        return self.collate([self.examples[i] for i in mine])

    def collate(self, examples: list) -> tuple[torch.Tensor, ...]:
        return collate_sft(examples, self.pad_id, self.buckets)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos, "size": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["size"] != len(self.examples):
            raise MinigptError(
                f"batch state was saved for {state['size']} conversations with seed "
                f"{state['seed']}; this run has {len(self.examples)} with seed {self.seed}: "
                "resume with the run's own config and data"
            )
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._plan()


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


def split_conversations(
    conversations: Sequence[Conversation], val_fraction: float
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, val): the last `val_fraction` of the conversations (at least one when the
    fraction is positive and two or more exist) are held out, the same every run."""
    if not 0 <= val_fraction < 1:
        raise MinigptError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * len(conversations)))
    if len(conversations) - n_val < 1:
        raise MinigptError(
            f"{len(conversations)} conversation(s) cannot be split into training and "
            f"validation (data.val_fraction={val_fraction})"
        )
    cut = len(conversations) - n_val
    return list(conversations[:cut]), list(conversations[cut:])


def chat_hook(config: RunConfig, tokenizer: Tokenizer) -> EvalHook:
    """An eval hook every `train.eval_every` steps: the model's reply to each of
    `eval.sample_prompts` as a fresh one-turn chat (at most `eval.sample_tokens` tokens, top-k
    `eval.sample_top_k`). Sampling uses the engine's own generator seeded by `train.seed`, so a
    resumed run computes the same as an unbroken one."""
    from minigpt.chat import ChatSession
    from minigpt.engine import Engine, Sampling

    ev, seed = config.eval, config.train.seed
    sampling = Sampling(temperature=1.0, top_k=ev.sample_top_k if ev.sample_top_k > 0 else None)

    def reply(step: int, model: GPT) -> dict:
        engine = Engine(model, tokenizer.n_vocab)
        texts = []
        for prompt in ev.sample_prompts:
            session = ChatSession(engine, tokenizer, sampling, ev.sample_tokens, seed)
            texts.append(f"User: {prompt}\nAssistant: {''.join(session.reply(prompt))}")
        return {"chat_samples": texts}

    return EvalHook("chat_samples", config.train.eval_every, reply)


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
    )
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


def init_model(init: str | Path, sequence_length: int) -> GPT:
    """The starting weights: a run, checkpoint or Hugging Face GPT-2 directory (float32)."""
    model = load_model(init)
    if sequence_length > model.config.block_size:
        raise MinigptError(
            f"train.sequence_length={sequence_length} exceeds {init}'s context "
            f"(block_size={model.config.block_size}); lower it"
        )
    return model.float().train()


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

    def setup(dist: DistContext):
        model = init_model(init, config.train.sequence_length)
        torch.manual_seed(config.train.seed + dist.rank)  # different dropout masks per rank
        tokenizer = get_tokenizer()
        batches, val = build_data(config, tokenizer, dist)
        hooks = [chat_hook(config, tokenizer)] if config.eval.sample_tokens > 0 else []
        return model, batches, val, hooks, None

    notes = {"init.txt": f"{init}\n"}  # where the weights came from (written on a fresh start)
    return run_training(config, run_dir, resume_from, dist, setup, notes)
