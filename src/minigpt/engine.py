"""Batched autoregressive generation over token ids: prefill once, then one token per step.

The engine knows token ids only, never the tokenizer: callers encode prompts, choose stop ids and
decode what comes back. A batch of prompts of different lengths is left-padded to a common end,
with a key mask so no real token attends to padding and position ids that start at each prompt's
first real token, so every row computes what it would alone. Decoding reads earlier keys from a
preallocated `KVCache` (or, with `use_kv_cache=False`, re-runs the whole sequence each step:
the same sampling, kept as a reference and for debugging). Sequences that stop leave the batch,
so they cost nothing afterwards. The loop syncs with the device once per step, to hand the new
token ids to the host, which streaming and stop checks need anyway.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minigpt.errors import MinigptError
from minigpt.model import GPT, KVCache

PAD_ID = 0  # any valid id: padded positions are masked out of attention and never sampled from


class EngineError(MinigptError, ValueError):
    """A generation request that cannot be served (bad prompt, settings, or context)."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy (argmax); top_k keeps the k most
    likely tokens; top_p keeps the smallest set whose probability reaches p (nucleus)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise EngineError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token id per row of `logits` (B, V)."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.size(-1):
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the more likely ones already reach p; the top token always stays
        drop = probs.cumsum(dim=-1) - probs >= sampling.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def left_pad(
    prompts: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(ids, key_mask, pos), each (B, T) for T the longest prompt: prompts end-aligned, key_mask
    True on real tokens (None when nothing is padded), positions counting from each real start."""
    T = max(map(len, prompts))
    ids = torch.tensor([[PAD_ID] * (T - len(p)) + list(p) for p in prompts], device=device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    key_mask = torch.arange(T, device=device)[None, :] >= (T - lengths)[:, None]
    pos = (key_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    padded = any(len(p) < T for p in prompts)
    return ids, (key_mask if padded else None), pos


class CachedDecoder:
    """Prefill the prompts into a KVCache once; each step then feeds one token per row."""

    def __init__(self, model: GPT, prompts: Sequence[Sequence[int]], max_len: int) -> None:
        device = model.transformer.wte.weight.device
        self.model = model
        self.ids, key_mask, self.pos = left_pad(prompts, device)
        self.cache = KVCache(
            model.config, len(prompts), max_len, device, model.transformer.wte.weight.dtype
        )
        self.key_mask = None
        if key_mask is not None:  # generated tokens are always real: True after the prompts
            self.key_mask = torch.ones(len(prompts), max_len, dtype=torch.bool, device=device)
            self.key_mask[:, : key_mask.size(1)] = key_mask
        self.next_pos = self.pos[:, -1] + 1

    def prefill(self) -> torch.Tensor:
        """Logits (B, V) for the token after each prompt."""
        logits, _ = self.model(
            self.ids, pos=self.pos, key_mask=self.key_mask, kv_cache=self.cache, last_only=True
        )
        return logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); logits (B, V) for the next."""
        logits, _ = self.model(
            tokens[:, None],
            pos=self.next_pos[:, None],
            key_mask=self.key_mask,
            kv_cache=self.cache,
            last_only=True,
        )
        self.next_pos = self.next_pos + 1
        return logits[:, -1]

    def select(self, rows: torch.Tensor) -> None:
        """Keep, reorder or repeat batch rows."""
        self.cache.select(rows)
        self.next_pos = self.next_pos[rows]
        if self.key_mask is not None:
            self.key_mask = self.key_mask[rows]


class ReforwardDecoder:
    """The reference: every step re-runs the model over the whole (padded) sequence so far.
    Takes CachedDecoder's arguments; max_len is unused, the sequence just grows."""

    def __init__(self, model: GPT, prompts: Sequence[Sequence[int]], max_len: int) -> None:
        self.model = model
        device = model.transformer.wte.weight.device
        self.ids, self.key_mask, self.pos = left_pad(prompts, device)

    def prefill(self) -> torch.Tensor:
        logits, _ = self.model(self.ids, pos=self.pos, key_mask=self.key_mask, last_only=True)
        return logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.pos = torch.cat([self.pos, self.pos[:, -1:] + 1], dim=1)
        if self.key_mask is not None:
            self.key_mask = F.pad(self.key_mask, (0, 1), value=True)
        return self.prefill()

    def select(self, rows: torch.Tensor) -> None:
        self.ids, self.pos = self.ids[rows], self.pos[rows]
        if self.key_mask is not None:
            self.key_mask = self.key_mask[rows]


class Engine:
    """Generates continuations of token-id prompts with a GPT.

    n_vocab: ids the tokenizer can decode (50,260 with the chat tokens, 50,257 for plain GPT-2);
    the model's padded rows above it are never sampled.
    """

    def __init__(self, model: GPT, n_vocab: int, use_kv_cache: bool = True) -> None:
        if not 0 < n_vocab <= model.config.vocab_size:
            raise EngineError(f"n_vocab {n_vocab} must be in 1..{model.config.vocab_size}")
        self.model = model.eval()
        self.n_vocab = n_vocab
        self.use_kv_cache = use_kv_cache
        self.device = model.transformer.wte.weight.device

    @torch.inference_mode()
    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        *,
        num_samples: int = 1,
        stop_ids: Collection[int] | Sequence[Collection[int]] = (),
        seed: int | None = None,
    ) -> Iterator[list[tuple[int, int]]]:
        """Yield, per decode step, the `(sequence, token)` pairs of the sequences still running.

        Sequence `i * num_samples + j` is sample j of prompt i; all samples of a prompt share
        its prefill. A sequence ends after a token in its stop ids (that token is yielded) or
        after max_new_tokens, or when the context is full (prompt + output reach block_size + 1,
        the last token needing no position). stop_ids: one collection for every prompt, or one
        per prompt. seed makes sampling reproducible for the same request.
        """
        self._check(prompts, max_new_tokens, num_samples)
        stops = self._stop_sets(stop_ids, len(prompts))
        block = self.model.config.block_size
        limits = [
            min(max_new_tokens, block + 1 - len(p)) for p in prompts for _ in range(num_samples)
        ]
        stops = [s for s in stops for _ in range(num_samples)]
        generator = None
        if seed is not None:
            generator = torch.Generator(self.device).manual_seed(seed)
        decoder, logits = self._prefill(prompts, max(limits), num_samples)
        active = list(range(len(limits)))  # the sequence each batch row holds
        produced = [0] * len(limits)
        while True:
            tokens = sample_next(logits[:, : self.n_vocab], sampling, generator)
            host = tokens.tolist()  # the step's one device sync
            yield list(zip(active, host, strict=True))
            keep = []
            for row, (seq, token) in enumerate(zip(active, host, strict=True)):
                produced[seq] += 1
                if token not in stops[seq] and produced[seq] < limits[seq]:
                    keep.append(row)
            if not keep:
                return
            if len(keep) < len(active):
                rows = torch.tensor(keep, device=self.device)
                decoder.select(rows)
                tokens = tokens[rows]
                active = [active[row] for row in keep]
            logits = decoder.step(tokens)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        *,
        num_samples: int = 1,
        stop_ids: Collection[int] | Sequence[Collection[int]] = (),
        seed: int | None = None,
    ) -> list[list[int]]:
        """The generated ids of every sequence (see `stream`), stop token included."""
        outputs: list[list[int]] = [[] for _ in range(len(prompts) * num_samples)]
        for events in self.stream(
            prompts,
            max_new_tokens,
            sampling,
            num_samples=num_samples,
            stop_ids=stop_ids,
            seed=seed,
        ):
            for seq, token in events:
                outputs[seq].append(token)
        return outputs

    def _prefill(
        self, prompts: Sequence[Sequence[int]], max_new: int, num_samples: int
    ) -> tuple[CachedDecoder | ReforwardDecoder, torch.Tensor]:
        """A decoder with the prompts run, fanned out to num_samples rows each, and the logits
        (B, V) of every row's first new token."""
        decoder_type = CachedDecoder if self.use_kv_cache else ReforwardDecoder
        decoder = decoder_type(self.model, prompts, max(map(len, prompts)) + max_new - 1)
        logits = decoder.prefill()
        if num_samples > 1:
            rows = torch.arange(len(prompts), device=self.device).repeat_interleave(num_samples)
            decoder.select(rows)
            logits = logits[rows]
        return decoder, logits

    def _check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, num_samples: int):
        if max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if num_samples < 1:
            raise EngineError(f"num_samples must be >= 1, got {num_samples}")
        if not prompts:
            raise EngineError("no prompts to generate from")
        block = self.model.config.block_size
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise EngineError(f"prompt {i} is empty; start it with at least one token")
            if len(prompt) > block:
                raise EngineError(
                    f"prompt {i} has {len(prompt)} tokens, more than the model's context of "
                    f"{block}; shorten it"
                )
            if not all(0 <= t < self.n_vocab for t in prompt):
                raise EngineError(f"prompt {i} has token ids outside 0..{self.n_vocab - 1}")

    @staticmethod
    def _stop_sets(
        stop_ids: Collection[int] | Sequence[Collection[int]], n_prompts: int
    ) -> list[frozenset[int]]:
        """One stop set per prompt, from a shared collection or a per-prompt sequence of them."""
        items = list(stop_ids)
        if items and not isinstance(items[0], int):
            if len(items) != n_prompts:
                raise EngineError(f"{len(items)} stop-id sets for {n_prompts} prompts")
            return [frozenset(s) for s in items]
        return [frozenset(items)] * n_prompts
