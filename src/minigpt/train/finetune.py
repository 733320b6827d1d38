"""What the fine-tuning stages share: sft, dpo, rm and rl.

The starting weights (`init_model`: a run, checkpoint or Hugging Face GPT-2 directory, its path
recorded in `RUN/init.txt` and read back on resume by `starting_model`), preference pairs
(`load_pairs`, served by `PairBatches`), the held-out split (`split_conversations`: the last share of the
records, the same every run), a seeded, resumable, rank-sliced stream of whole examples
(`ConversationBatches`; a stage's subclass collates its own records), the lengths those batches
are padded to under `train.compile` (`batch_lengths`), and the eval hook that chats with the
model (`chat_hook`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from minigpt.checkpoints import LM_HEAD, load_model
from minigpt.config import RunConfig, TrainSection
from minigpt.data.chat import collate_sft, length_buckets
from minigpt.data.preference import RenderedPair, collate_pairs, load_preferences, render_pairs
from minigpt.errors import MinigptError
from minigpt.model import GPT
from minigpt.tokenizer import Tokenizer
from minigpt.train.trainer import EvalHook

Example = tuple[list[int], list[int]]  # rendered (ids, mask)
INIT_NOTE = "init.txt"  # RUN/init.txt: where a fine-tuning run's starting weights came from
Record = TypeVar("Record")  # a conversation, a preference pair...


def init_model(init: str | Path, sequence_length: int, head: str | None = LM_HEAD) -> GPT:
    """The starting weights: a run, checkpoint or Hugging Face GPT-2 directory (float32);
    `head` as `checkpoints.load_model` takes it."""
    model = load_model(init, head=head)
    if sequence_length > model.config.block_size:
        raise MinigptError(
            f"train.sequence_length={sequence_length} exceeds {init}'s context "
            f"(block_size={model.config.block_size}); lower it"
        )
    return model.float().train()


def starting_model(
    init: str | Path | None, run_dir: Path, resume_from: str | Path | None, stage: str
) -> Path:
    """--init, or for a resumed run the starting weights it recorded (a frozen reference is
    always the weights the run started from, never the resumed ones)."""
    if init is not None:
        return Path(init).resolve()
    note = run_dir / INIT_NOTE
    if resume_from is None or not note.is_file():
        raise MinigptError(
            f"minigpt {stage} needs --init MODEL (a run, checkpoint or HF GPT-2 dir)"
        )
    path = Path(note.read_text().strip())
    if not path.exists():
        raise MinigptError(
            f"{run_dir} started from {path}, which is gone; pass --init with the same weights"
        )
    return path


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


class PairBatches(ConversationBatches):
    """Training micro-batches of `micro_batch` preference pairs (2 x micro_batch sequences): the
    seeded, resumable, rank-sliced stream of ConversationBatches over pairs, padded to its
    `buckets` the same way (`collate_pairs` unless a stage brings its own `collate_fn`)."""

    def __init__(self, *args, collate_fn=collate_pairs, **kwargs):
        super().__init__(*args, **kwargs)
        self.collate_fn = collate_fn

    def collate(self, examples: list) -> tuple[torch.Tensor, ...]:
        return self.collate_fn(examples, self.pad_id, self.buckets)


def load_pairs(
    config: RunConfig, tokenizer: Tokenizer, verbose: bool = True, max_tokens: int | None = None
) -> tuple[list[RenderedPair], list[RenderedPair]]:
    """Rendered (train, val) pairs from `config.data`, prompt + reply at most `max_tokens`
    (default sequence_length + 1: inputs and shifted targets) tokens; what loading and
    truncation cost is printed when `verbose`."""
    data = config.data
    if not data.source:
        raise MinigptError("data.source is not set: a hub name, a .json/.jsonl file or chitchat")
    loaded = load_preferences(
        data.source,
        data.format or None,
        split=data.split,
        limit=data.limit or None,
        seed=config.train.seed,
        rejected=data.rejected,
    ).require_some()
    train, val = split_conversations(loaded.pairs, data.val_fraction)
    max_tokens = max_tokens or config.train.sequence_length + 1
    train, stats = render_pairs(train, tokenizer, max_tokens)
    val, val_stats = render_pairs(val, tokenizer, max_tokens)
    if verbose:
        print(
            f"{loaded.summary()}; {len(train)} train / {len(val)} val pairs within {max_tokens} "
            f"tokens: {stats.prompt_cut + val_stats.prompt_cut} prompts lost leading turns, "
            f"{stats.reply_cut + val_stats.reply_cut} replies cut, "
            f"{stats.dropped + val_stats.dropped} pairs dropped (last user turn fills it)",
            flush=True,
        )
    if not train:
        raise MinigptError("no training pairs left after the validation split and truncation")
    return train, val


def split_conversations(
    conversations: Sequence[Record], val_fraction: float
) -> tuple[list[Record], list[Record]]:
    """(train, val): the last `val_fraction` of the conversations (or preference pairs; at least
    one when the fraction is positive and two or more exist) are held out, the same every run."""
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
    sampling = Sampling(temperature=1.0, top_k=ev.sample_top_k)

    def reply(step: int, model: GPT) -> dict:
        engine = Engine(model, tokenizer.n_vocab)
        texts = []
        for prompt in ev.sample_prompts:
            session = ChatSession(engine, tokenizer, sampling, ev.sample_tokens, seed)
            texts.append(f"User: {prompt}\nAssistant: {''.join(session.reply(prompt))}")
        return {"chat_samples": texts}

    return EvalHook("chat_samples", config.train.eval_every, reply)
