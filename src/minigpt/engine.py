"""Autoregressive generation over token ids with continuous batching: one engine, every caller.

The engine knows token ids only, never the tokenizer: callers encode prompts, choose stop ids and
decode what comes back. A `Batcher` owns a batch of rows, each one sequence: a submitted request
waits in a queue until it has rows, is prefilled together with the other waiting prompts (in
chunks of a token budget per step, between decode steps), then joins the running batch and
advances one token per `step` alongside the others; sequences that stop, reach their limit or are
cancelled leave between steps, and their rows go to the next request. The `KVCache` keeps one
length per row, so rows of different lengths decode together without padding; it is the
engine's own, and the model's forward knows it only through the methods
`minigpt.model.AttentionCache` names. An engine may keep a `PrefixCache` of finished sequences'
keys and values, from which a prompt that starts the same way is restored instead of prefilled.
`Engine.stream`/`generate` (the CLI, chat, training samples) and the server's scheduler all run
on a Batcher. With `use_kv_cache=False` every step re-runs each whole
sequence instead (left-padded to a common end): the same sampling, kept as a reference.
Each step syncs with the device once, to hand the new token ids to the host, which streaming and
stop checks need anyway (once more when a sequence asked for its tokens' logprobs). A request
may ask for logprobs of its generated tokens and of its prompt (scoring, as the server's `echo`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from minigpt.errors import MinigptError
from minigpt.model import GPT, GPTConfig
from minigpt.prefix_cache import PrefixCache

PAD_ID = 0  # any valid id: padded positions are masked out of attention and never sampled from


class EngineError(MinigptError, ValueError):
    """A generation request that cannot be served (bad prompt, settings, or context)."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy (argmax); top_k keeps the k most
    likely tokens (0 or None: no cut, as the server's `top_k: 0`); top_p keeps the smallest set
    whose probability reaches p (nucleus)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise EngineError(f"top_k must be >= 0 (0 = no top-k cut), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")


# below this temperature sampling is greedy: dividing by less overflows float32 logits to inf
MIN_TEMPERATURE = 1e-4


def sample_next(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token id per row of `logits` (B, V). A row whose scaled logits are not finite takes
    its argmax, so the probabilities sampled from are always finite."""
    greedy = logits.argmax(dim=-1)
    if sampling.temperature < MIN_TEMPERATURE:
        return greedy
    logits = logits.float() / sampling.temperature
    finite = torch.isfinite(logits).all(dim=-1)
    logits = logits.masked_fill(~finite[:, None], 0.0)
    if sampling.top_k and sampling.top_k < logits.size(-1):
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the more likely ones already reach p; the top token always stays
        drop = probs.cumsum(dim=-1) - probs >= sampling.top_p
        drop[:, 0] = False  # even for a p that float32 rounds to 0 (5e-324)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    sampled = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
    return torch.where(finite, sampled, greedy)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (log-softmax of its raw logits over the ids
    the engine can sample, before temperature or top-k/top-p), and the `top` most likely ids
    at that position with theirs, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Each row's `tokens` entry scored by the log-softmax of its logits (N, V), with the
    row's `top` best ids: one float32 log-softmax, so a token that is the argmax has exactly
    the top entry's value."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, tokens[:, None].long())[:, 0].tolist()
    best = [[]] * len(chosen)
    if top:
        values, ids = logp.topk(min(top, logp.size(-1)), dim=-1)
        pairs = zip(ids.tolist(), values.tolist(), strict=True)
        best = [list(zip(i, v, strict=True)) for i, v in pairs]
    return [
        TokenLogprob(t, lp, tuple(b))
        for t, lp, b in zip(tokens.tolist(), chosen, best, strict=True)
    ]


# positions whose logits are materialised at once when scoring a prompt (each row is V floats)
SCORE_CHUNK = 128


def causal_mask(start: int, T: int, device: torch.device) -> torch.Tensor:
    """The (1, T, S) "may attend" mask of T queries after `start` cached keys (S = start + T)."""
    q_pos = torch.arange(start, start + T, device=device)[:, None]
    k_pos = torch.arange(start + T, device=device)[None, :]
    return (k_pos <= q_pos).unsqueeze(-3)


class KVCache:
    """Keys and values of every layer for `batch_size` rows, preallocated for `max_len` positions.

    Each row is one sequence with its own length, stored from position 0 of its row, so rows
    can join, leave and be copied independently (continuous batching). A forward works on the
    rows `select_rows` names (default all) and writes its T new keys at each row's length: T
    positions at once when those rows share a length (a prefill, or a batch in step), one
    position per row (a decode step of sequences of different lengths), or, given each row's
    count of real tokens, chunks of different lengths right-padded to T (a batched prefill of
    prompts in chunks; the padding is neither stored nor attended to). Lengths live on the host
    too, so choosing shapes and masks never waits for the device.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        """dtype None: the dtype of the keys the attention produces, taken at the first write (a
        float32 model under bf16 or fp16 autocast makes keys in that dtype, not its own)."""
        self.shape = (
            config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head
        )  # fmt: skip
        self.device, self.max_len = torch.device(device), max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        if dtype is not None:
            self._allocate(dtype)
        self.lengths = [0] * batch_size  # host copy of each row's length
        self._lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.rows = slice(0, batch_size)  # the rows the next forward reads and extends
        self.counts: list[int] | None = None  # real tokens per selected row; None: all T
        self._mode, self._end = "uniform", 0  # set by `begin` for the forward in progress
        # where the forward in progress writes: (row, position) per row in "rows" mode; (row,
        # step, position) per real token in "chunks" mode
        self._writes: tuple[torch.Tensor, ...] = ()

    def _allocate(self, dtype: torch.dtype) -> None:
        self.k = torch.zeros(self.shape, device=self.device, dtype=dtype)
        self.v = torch.zeros(self.shape, device=self.device, dtype=dtype)

    def storage_for(self, dtype: torch.dtype) -> None:
        """Storage in `dtype`: allocated at the first write, or again while no row holds keys
        (the next sequence runs under another autocast); mixing dtypes in one row is refused."""
        if self.k is not None and self.k.dtype == dtype:
            return
        if self.k is not None and any(self.lengths):
            raise ValueError(
                f"KV cache holds {self.k.dtype} keys but this forward made {dtype} keys: run "
                "every forward of a cached sequence under the same autocast (or none)"
            )
        self._allocate(dtype)

    @property
    def length(self) -> int:
        """The common length of the selected rows."""
        lengths = set(self.lengths[self.rows])
        if len(lengths) != 1:
            raise ValueError(f"rows {self.rows} have different lengths {sorted(lengths)}")
        return lengths.pop()

    def select_rows(self, start: int, stop: int, counts: Sequence[int] | None = None) -> None:
        """Make the next forwards work on rows start..stop-1 (its batch is stop - start rows).
        counts: for the next forward only, the real tokens of each row's right-padded chunk."""
        self.rows = slice(start, stop)
        self.counts = None if counts is None else list(counts)

    def begin(self, T: int) -> tuple[int, torch.Tensor | None]:
        """Prepare a forward of T new tokens on the selected rows: (S, the keys it will attend
        to, one past the longest row's end; its "may attend" mask, or None where no mask is
        exact: a prefill from position 0 (plain causal), or one new token per row on rows of one
        length (it sees every key, so SDPA takes its fast unmasked path))."""
        lengths = self.lengths[self.rows]
        counts = self.counts or [T] * len(lengths)
        self._end = max(n + c for n, c in zip(lengths, counts, strict=True))
        if self._end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot hold {self._end}")
        device = self._lengths.device
        if len(set(lengths)) == 1 and set(counts) == {T}:
            self._mode = "uniform"
            if T == 1 or lengths[0] == 0:
                return self._end, None
            return self._end, causal_mask(lengths[0], T, device)
        k_pos = torch.arange(self._end, device=device)
        if T == 1:
            self._mode = "rows"  # where each row writes, found once for all the layers
            at = self._lengths[self.rows]
            self._writes = (torch.arange(len(lengths), device=device), at)
            return self._end, (k_pos[None, :] <= at[:, None])[:, None, None, :]
        self._mode = "chunks"
        row, step = zip(*[(r, t) for r, c in enumerate(counts) for t in range(c)], strict=True)
        row, step = torch.tensor(row, device=device), torch.tensor(step, device=device)
        self._writes = (row, step, self._lengths[self.rows][row] + step)
        q_pos = self.positions(T, clamp=False)
        return self._end, (k_pos[None, None, :] <= q_pos[:, :, None])[:, None]

    def positions(self, T: int, clamp: bool = True) -> torch.Tensor:
        """(B, T) position ids of T new tokens on each selected row (a padded chunk's padding
        gets the last position, never one past the context)."""
        pos = self._lengths[self.rows, None] + torch.arange(T, device=self._lengths.device)
        return pos.clamp(max=self.max_len - 1) if clamp else pos

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, H, T, D) keys and values (after `begin`); return all of the
        layer's so far (B, H, S, D) (`begin`'s mask hides the rest of shorter rows)."""
        self.storage_for(k.dtype)
        end = self._end
        keys, values = self.k[layer, self.rows], self.v[layer, self.rows]
        if self._mode == "uniform":
            keys[:, :, end - k.size(2) : end] = k
            values[:, :, end - k.size(2) : end] = v
        elif self._mode == "chunks":  # each row's real tokens, at its own length onward
            row, step, at = self._writes
            keys[row, :, at] = k[row, :, step]
            values[row, :, at] = v[row, :, step]
        else:  # one new position per row, each at its own length
            batch, at = self._writes
            keys[batch, :, at] = k[:, :, 0]
            values[batch, :, at] = v[:, :, 0]
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, T: int) -> None:
        """The selected rows grew by T tokens, or by their counts (the model calls this after
        its layers)."""
        counts = self.counts or [T] * len(self.lengths[self.rows])
        for row, count in zip(range(*self.rows.indices(len(self.lengths))), counts, strict=True):
            self.lengths[row] += count
        grown = T if self.counts is None else torch.tensor(counts, device=self._lengths.device)
        self._lengths[self.rows] += grown
        self.counts = None

    def copy_row(self, src: int, dst: int) -> None:
        """Row dst becomes a copy of row src (fan a prompt out to samples, or compact rows)."""
        n = self.lengths[src]
        if n == 0:  # nothing written yet (and perhaps no storage either)
            self.clear_row(dst)
            return
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n
        self._lengths[dst] = n

    def clear_row(self, row: int) -> None:
        """Forget a row's sequence; its storage is reused by the next one."""
        self.set_length(row, 0)

    def set_length(self, row: int, n: int) -> None:
        """The row holds n positions (written by someone else: a prefix cache's copy)."""
        self.lengths[row] = n
        self._lengths[row] = n


class CachedDecoder:
    """Rows of a preallocated KVCache, filled by whoever owns them (the Batcher says which row
    holds what): prompts are prefilled in chunks into given rows, each step feeds one token to
    each of rows 0..n-1. Both return final hidden states: the caller runs the head once over
    every row that needs logits."""

    def __init__(self, model: GPT, max_rows: int, max_len: int) -> None:
        self.model = model
        # the cache takes the dtype of the keys: the weights' own, or an autocast's
        self.cache = KVCache(model.config, max_rows, max_len, model.transformer.wte.weight.device)

    def prefill(self, start: int, chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Extend rows start, start+1, ... by one chunk of tokens each, in one forward: the
        final hidden states (rows, T, C) of the chunks, right-padded to the longest, T."""
        T = max(map(len, chunks))
        ids = torch.tensor(
            [list(c) + [PAD_ID] * (T - len(c)) for c in chunks], device=self.cache.device
        )
        counts = [len(c) for c in chunks]
        self.cache.select_rows(start, start + len(chunks), None if set(counts) == {T} else counts)
        return self.model.hidden_states(ids, kv_cache=self.cache)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token to each of rows 0..n-1 (tokens (n,)); their final hidden states (n, C),
        for the head."""
        self.cache.select_rows(0, len(tokens))
        return self.model.hidden_states(tokens[:, None], kv_cache=self.cache)[:, -1]

    def copy(self, src: int, dst: int) -> None:
        self.cache.copy_row(src, dst)

    def clear(self, row: int) -> None:
        self.cache.clear_row(row)


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


class ReforwardDecoder:
    """The reference: every forward re-runs the model over each row's whole sequence so far
    (rows left-padded to a common end, with a key mask and per-row positions). CachedDecoder's
    API."""

    def __init__(self, model: GPT, max_rows: int, max_len: int) -> None:
        self.model = model
        self.device = model.transformer.wte.weight.device
        self.rows: list[list[int]] = [[] for _ in range(max_rows)]

    def prefill(self, start: int, chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        rows = self.rows[start : start + len(chunks)]
        for row, chunk in zip(rows, chunks, strict=True):
            row += chunk
        ids, key_mask, pos = left_pad(rows, self.device)
        hidden = self.model.hidden_states(ids, pos=pos, key_mask=key_mask)
        out = hidden.new_zeros(len(chunks), max(map(len, chunks)), hidden.size(-1))
        for i, chunk in enumerate(chunks):  # each chunk's positions, at the end of its row
            out[i, : len(chunk)] = hidden[i, hidden.size(1) - len(chunk) :]
        return out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.rows[: len(tokens)]
        for row, token in zip(rows, tokens.tolist(), strict=True):
            row.append(token)
        ids, key_mask, pos = left_pad(rows, self.device)
        return self.model.hidden_states(ids, pos=pos, key_mask=key_mask, last_only=True)[:, -1]

    def copy(self, src: int, dst: int) -> None:
        self.rows[dst] = list(self.rows[src])

    def clear(self, row: int) -> None:
        self.rows[row] = []


class GeneratedSequence:
    """One sequence a request asked for: its tokens so far and, once it has ended, why
    ("stop": a stop id, which is included in `tokens`; "length": its token limit or the
    context; "cancelled"; "error": its row could not be sampled, `error` says why).

    With `logprobs` (a number of alternatives, 0 for none) each token's `TokenLogprob` joins
    `token_logprobs`; a request with prompt logprobs gets `prompt_logprobs` once prefilled:
    None for the first prompt token (nothing predicts it), then each later one's."""

    def __init__(
        self,
        prompt: Sequence[int],
        limit: int,
        sampling: Sampling,
        stop_ids: frozenset[int],
        generator: torch.Generator | None,
        index: int,
        logprobs: int | None = None,
    ) -> None:
        self.prompt = prompt
        self.limit = limit
        self.sampling = sampling
        self.stop_ids = stop_ids
        self.generator = generator
        self.index = index  # which of its request's n samples
        self.logprobs = logprobs
        self.tokens: list[int] = []
        self.token_logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Pending:
    prompt: list[int]
    sequences: list[GeneratedSequence]
    prompt_logprobs: int | None = None  # alternatives per prompt position; None: not scored


@dataclass
class _Prefilling:
    """An admitted request whose prompt is being prefilled, chunk by chunk, into its row."""

    pending: _Pending
    sequences: list[GeneratedSequence]  # its live samples, the first in its row
    done: int = 0  # prompt tokens in the row so far
    scored: list[TokenLogprob] = field(default_factory=list)  # prompt logprobs so far

    @property
    def remaining(self) -> int:
        return len(self.pending.prompt) - self.done


class Batcher:
    """Continuous batching over at most `max_rows` sequences of up to `max_len` positions.

    `submit` queues a request; each `step` runs in phases: drop (cancelled rows), decode (the
    running rows advance one token), admit (queued requests that fit into free rows: they start
    prefilling), prefill (the prefilling prompts, oldest first, together in one forward of at
    most `max_prefill_tokens` prompt tokens, so that a long prompt is spread over several steps
    instead of stalling the running rows), join (prompts now prefilled join the running rows,
    copied to their further samples), sample (one head over every running row, joined ones
    included, then each row's next token), finish (record the `(sequence, token)` pairs it
    returns; finished sequences leave at once).

    Rows: the running sequences hold cache rows 0..running-1 (a row that leaves is replaced by
    the last one: one row copied); the prefilling prompts hold the rows just after them, in
    order. Since each step's prefill budget goes to the oldest first, only the oldest
    prefilling prompt can be part-way, so keeping that layout costs at most one row copy.

    A row's computation does not depend on the others beyond float rounding, so a greedy
    request gets the tokens it gets alone. A row whose logits are not finite, or whose sampling
    raises, ends alone with finish_reason "error" (listed in `failed` after that step, with no
    token); the other rows go on. Not thread-safe: one thread owns a Batcher.
    """

    def __init__(
        self,
        engine: Engine,
        max_rows: int,
        max_len: int | None = None,
        max_prefill_tokens: int | None = None,
    ) -> None:
        block = engine.model.config.block_size
        if max_rows < 1:
            raise EngineError(f"max_rows must be >= 1, got {max_rows}")
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise EngineError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        self.engine = engine
        self.max_rows = max_rows
        self.max_len = min(max_len or block, block)
        self.max_prefill_tokens = max_prefill_tokens  # None: every admitted prompt at once
        decoder_type = CachedDecoder if engine.use_kv_cache else ReforwardDecoder
        self.decoder = decoder_type(engine.model, max_rows, self.max_len)
        self.prefix = engine.prefix_cache
        self.rows: list[GeneratedSequence] = []  # the sequence each running row holds
        self.prefilling: list[_Prefilling] = []  # in rows running.., oldest first
        self.queue: deque[_Pending] = deque()
        self.next_tokens: torch.Tensor | None = None  # sampled, not yet fed; one per row
        self.failed: list[GeneratedSequence] = []  # sequences the last step ended with an error

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def occupied(self) -> int:
        """Rows taken: the running ones and those the prefilling requests hold for their
        samples."""
        return len(self.rows) + sum(len(p.sequences) for p in self.prefilling)

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def idle(self) -> bool:
        return not self.rows and not self.prefilling and not self.queue

    def submit(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        *,
        n: int = 1,
        stop_ids: Collection[int] = (),
        seed: int | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> list[GeneratedSequence]:
        """Queue `n` samples of a continuation of `prompt`; they share its prefill. A sequence
        ends after a stop id, after max_new_tokens, or when the context is full (prompt +
        output reach block_size + 1: the last token needs no position). seed makes its samples
        reproducible whatever else is in the batch. logprobs / prompt_logprobs: score each
        generated / prompt token, with that many most likely alternatives (None: do not)."""
        self.engine.check_prompt(prompt)
        for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if value is not None and value < 0:
                raise EngineError(f"{name} must be >= 0 (alternatives per token), got {value}")
        if max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 1 <= n <= self.max_rows:
            raise EngineError(f"n must be in 1..{self.max_rows} (the batch's rows), got {n}")
        limit = min(max_new_tokens, self.max_len + 1 - len(prompt))
        if limit < 1:
            raise EngineError(
                f"prompt of {len(prompt)} tokens leaves no room in {self.max_len} positions"
            )
        stops = frozenset(stop_ids)
        sequences = [
            GeneratedSequence(prompt, limit, sampling, stops, self._generator(seed, i), i, logprobs)
            for i in range(n)
        ]
        self.queue.append(_Pending(list(prompt), sequences, prompt_logprobs))
        return sequences

    def cancel(self, sequence: GeneratedSequence) -> None:
        """End a sequence; its row is freed at the start of the next step."""
        sequence.cancelled = True

    @torch.inference_mode()
    def step(self) -> list[tuple[GeneratedSequence, int]]:
        """One round: the new token of every running sequence."""
        self.failed = []
        self._drop_cancelled()
        hidden = self._decode()
        self._admit()
        hidden += self._join(self._prefill())
        if not hidden:
            return []
        # one head over every row: its 50k-row matrix is read once a step, not once per phase
        logits = self.decoder.head(torch.cat(hidden) if len(hidden) > 1 else hidden[0])
        tokens, finite, errors = self._sample(logits)
        return self._finish(tokens, finite, errors, self._score(logits, tokens))

    # The phases of a step, in order. Rows are the running rows first, then the joining ones.
    def _drop_cancelled(self) -> None:
        """Free the rows of sequences cancelled since the last step, and forget prefilling
        requests with no live sample left."""
        self._drop([r for r, seq in enumerate(self.rows) if seq.cancelled])
        for entry in self.prefilling:
            for seq in entry.sequences:
                if seq.cancelled:
                    seq.finish_reason = "cancelled"
            entry.sequences = [seq for seq in entry.sequences if not seq.cancelled]
        # a part-way prompt is the oldest: whatever follows it into its row has not started
        self.prefilling = [entry for entry in self.prefilling if entry.sequences]

    def _decode(self) -> list[torch.Tensor]:
        """Feed every running row the token sampled for it last step: [their final hidden states
        (running, C)], or [] with nothing running."""
        return [self.decoder.step(self.next_tokens)] if self.rows else []

    def _admit(self) -> None:
        """Move queued requests, oldest first, to the prefilling ones while their live samples
        fit the free rows. A request whose samples were all cancelled just leaves the queue."""
        while self.queue:
            pending = self.queue[0]
            live = [seq for seq in pending.sequences if not seq.cancelled]
            if self.occupied + len(live) > self.max_rows:
                break
            self.queue.popleft()
            for seq in pending.sequences:
                if seq.cancelled:
                    seq.finish_reason = "cancelled"
            if live:
                self.prefilling.append(_Prefilling(pending, live))

    def _prefill(self) -> list[tuple[_Prefilling, torch.Tensor]]:
        """Give the prefilling prompts, oldest first, their next chunks within the budget, in
        one forward: the requests whose prompts are now all in, each with the final hidden
        state (C,) of its last prompt token."""
        budget = self.max_prefill_tokens or sum(p.remaining for p in self.prefilling)
        served: list[tuple[_Prefilling, int]] = []
        for entry in self.prefilling:
            if budget <= 0:
                break
            if entry.done == 0:
                self._start(entry, self.running + len(served))
            served.append((entry, min(entry.remaining, budget)))
            budget -= served[-1][1]
        if not served:
            return []
        chunks = [e.pending.prompt[e.done : e.done + n] for e, n in served]
        hidden = self.decoder.prefill(self.running, chunks)
        complete = []
        for i, (entry, n) in enumerate(served):
            if entry.pending.prompt_logprobs is not None:
                entry.scored += self._score_prompt(hidden[i], entry, n)
            entry.done += n
            if not entry.remaining:
                complete.append((entry, hidden[i, n - 1]))
        return complete

    def _start(self, entry: _Prefilling, row: int) -> None:
        """A prompt's first chunk goes into `row`: from the start, or after the longest prefix
        the prefix cache holds (not for a scored prompt: every position needs its logits; and
        the last prompt token is always run, for the next token's logits)."""
        self.decoder.clear(row)
        if self.prefix is not None and entry.pending.prompt_logprobs is None:
            prompt = entry.pending.prompt
            entry.done = self.prefix.restore(prompt, self.decoder.cache, row, len(prompt) - 1)

    def _join(self, complete: list[tuple[_Prefilling, torch.Tensor]]) -> list[torch.Tensor]:
        """The prefilled requests become running rows (they are the oldest prefilling ones, so
        their rows are the next ones already), their further samples copies of them after
        those; the part-way prompt, if any, moves past the copies. [The final hidden states of
        their last prompt tokens, one row per joining row], or [] with none joining."""
        if not complete:
            return []
        self.prefilling = self.prefilling[len(complete) :]
        firsts = len(self.rows)
        self.rows += [entry.sequences[0] for entry, _ in complete]
        extra = sum(len(entry.sequences) - 1 for entry, _ in complete)
        if extra and self.prefilling and self.prefilling[0].done:
            self.decoder.copy(len(self.rows), len(self.rows) + extra)
        hidden = torch.stack([h for _, h in complete])
        picks = list(range(len(complete)))
        for k, (entry, _) in enumerate(complete):
            for seq in entry.sequences[1:]:
                self.decoder.copy(firsts + k, len(self.rows))
                self.rows.append(seq)
                picks.append(k)
            if entry.pending.prompt_logprobs is not None:
                for seq in entry.sequences:
                    seq.prompt_logprobs = [None, *entry.scored]
        return [hidden[picks] if extra else hidden]

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[int, str]]:
        """One token per row: greedy rows by one argmax, the others with their own settings
        (rows without a seed and with equal settings share one call). Also each row's "logits
        are finite" flag (checked on the host with the tokens, in the step's one sync) and the
        rows whose sampling raised, with why."""
        logits = logits[:, : self.engine.n_vocab]
        # one pass: a NaN or an inf anywhere makes the row's sum so (finite logits summing past
        # float32's range would be flagged too; no model makes those)
        finite = torch.isfinite(logits.sum(dim=-1))
        tokens = logits.argmax(dim=-1)
        groups: dict[Sampling, list[int]] = {}
        errors: dict[int, str] = {}
        for r, seq in enumerate(self.rows):
            if seq.sampling.temperature == 0:
                continue
            if seq.generator is not None:
                try:
                    tokens[r] = sample_next(logits[r : r + 1], seq.sampling, seq.generator)[0]
                except Exception as e:  # this row's alone: the others go on
                    errors[r] = f"sampling failed: {type(e).__name__}: {e}"
            else:
                groups.setdefault(seq.sampling, []).append(r)
        for sampling, rows in groups.items():
            index = torch.tensor(rows, device=logits.device)
            try:
                tokens[index] = sample_next(logits[index], sampling)
            except Exception as e:
                errors.update(dict.fromkeys(rows, f"sampling failed: {type(e).__name__}: {e}"))
        return tokens, finite, errors

    def _score_prompt(self, hidden: torch.Tensor, entry: _Prefilling, n: int) -> list:
        """The logprobs of the prompt tokens that the chunk's n positions (hidden (T, C)) predict
        (the last prompt position predicts the first generated token, not a prompt token),
        SCORE_CHUNK positions of logits at a time."""
        prompt = entry.pending.prompt
        targets = torch.tensor(prompt[entry.done + 1 : entry.done + n + 1], device=hidden.device)
        scored = []
        for i in range(0, len(targets), SCORE_CHUNK):
            chunk = targets[i : i + SCORE_CHUNK]
            logits = self.decoder.head(hidden[i : i + len(chunk)])[:, : self.engine.n_vocab]
            scored += token_logprobs(logits, chunk, entry.pending.prompt_logprobs)
        return scored

    def _score(self, logits: torch.Tensor, tokens: torch.Tensor) -> dict[int, TokenLogprob]:
        """The sampled token's logprob on each row whose sequence asked for them, in one
        log-softmax over those rows."""
        rows = [r for r, seq in enumerate(self.rows) if seq.logprobs is not None]
        if not rows:
            return {}
        index = torch.tensor(rows, device=logits.device)
        top = max(self.rows[r].logprobs for r in rows)
        scored = token_logprobs(logits[index, : self.engine.n_vocab], tokens[index], top)
        return {
            r: TokenLogprob(s.token, s.logprob, s.top[: self.rows[r].logprobs])
            for r, s in zip(rows, scored, strict=True)
        }

    def _finish(
        self,
        tokens: torch.Tensor,
        finite: torch.Tensor,
        errors: dict[int, str],
        scores: dict[int, TokenLogprob],
    ) -> list[tuple[GeneratedSequence, int]]:
        """Hand every row its sampled token (one per row), end the sequences that stop, reach
        their limit or failed, and free their rows; keep the others' tokens to feed next step."""
        host, ok = torch.stack([tokens, finite.long()]).tolist()  # the step's one device sync
        events, finished = [], []
        for r, (seq, token) in enumerate(zip(self.rows, host, strict=True)):
            if not ok[r] or r in errors:
                seq.finish_reason = "error"
                seq.error = errors.get(r, "the model's logits for it are not finite (NaN or inf)")
                self.failed.append(seq)
            else:
                seq.tokens.append(token)
                if r in scores:
                    seq.token_logprobs.append(scores[r])
                events.append((seq, token))
                if token in seq.stop_ids:
                    seq.finish_reason = "stop"
                elif len(seq.tokens) >= seq.limit:
                    seq.finish_reason = "length"
            if seq.done:
                finished.append(r)
        self.next_tokens = tokens
        self._drop(finished)
        return events

    def _drop(self, dead: list[int]) -> None:
        """Remove rows: each is replaced by the current last row (one row copy, not a shift);
        a part-way prefilling prompt follows the running rows down (one more)."""
        if not dead:
            return
        order = list(range(len(self.rows)))
        end = len(self.rows)
        for r in sorted(dead, reverse=True):  # rows after r are alive by now
            seq = self.rows[r]
            if seq.cancelled:
                seq.finish_reason = "cancelled"
            if self.prefix is not None and seq.finish_reason != "error":
                # the row holds the prompt and every token but the last (sampled, not fed)
                self.prefix.store([*seq.prompt, *seq.tokens], self.decoder.cache, r)
            last = len(order) - 1
            if r != last:
                self.decoder.copy(last, r)
                order[r], self.rows[r] = order[last], self.rows[last]
            order.pop()
            self.rows.pop()
            self.decoder.clear(last)
        if self.prefilling and self.prefilling[0].done:
            self.decoder.copy(end, len(self.rows))
            self.decoder.clear(end)
        if self.rows and self.next_tokens is not None:
            self.next_tokens = self.next_tokens[torch.tensor(order, device=self.next_tokens.device)]

    def _generator(self, seed: int | None, index: int) -> torch.Generator | None:
        if seed is None:
            return None
        # sample i of a request gets its own stream; sample 0 is exactly `seed`
        return torch.Generator(self.engine.device).manual_seed(
            (seed + index * 0x9E3779B97F4A7C15) % 2**64
        )


class Engine:
    """Generates continuations of token-id prompts with a GPT.

    n_vocab: ids the tokenizer can decode (50,260 with the chat tokens, 50,257 for plain GPT-2);
    the model's padded rows above it are never sampled. prefix_cache_mb: memory for the keys and
    values of finished sequences, which later prompts that start the same way reuse instead of
    prefilling again (`minigpt.prefix_cache`; 0: off). Only for weights that stay fixed.
    """

    def __init__(
        self,
        model: GPT,
        n_vocab: int,
        use_kv_cache: bool = True,
        prefix_cache_mb: float = 0,
    ) -> None:
        if not 0 < n_vocab <= model.config.vocab_size:
            raise EngineError(f"n_vocab {n_vocab} must be in 1..{model.config.vocab_size}")
        if prefix_cache_mb < 0:
            raise EngineError(f"prefix_cache_mb must be >= 0 (0: off), got {prefix_cache_mb}")
        self.model = model.eval()
        self.n_vocab = n_vocab
        self.use_kv_cache = use_kv_cache
        self.device = model.transformer.wte.weight.device
        self.prefix_cache = (
            PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb and use_kv_cache else None
        )

    def batcher(
        self, max_rows: int, max_len: int | None = None, max_prefill_tokens: int | None = None
    ) -> Batcher:
        """A continuous batch of at most max_rows sequences of max_len positions (default the
        model's context), prefilling at most max_prefill_tokens prompt tokens a step (None: all
        the admitted prompts at once)."""
        return Batcher(self, max_rows, max_len, max_prefill_tokens)

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
        its prefill. Sequences end as in `Batcher.submit`. stop_ids: one collection for every
        prompt, or one per prompt. seed makes sampling reproducible for the same request.
        """
        if num_samples < 1:
            raise EngineError(f"num_samples must be >= 1, got {num_samples}")
        if not prompts:
            raise EngineError("no prompts to generate from")
        for i, prompt in enumerate(prompts):
            self.check_prompt(prompt, f"prompt {i + 1}")  # 1-based, as users count
        stops = self._stop_sets(stop_ids, len(prompts))
        block = self.model.config.block_size
        max_len = max(min(len(p) + max_new_tokens - 1, block) for p in prompts)
        batch = self.batcher(len(prompts) * num_samples, max_len)
        ids = {}
        for i, prompt in enumerate(prompts):
            seqs = batch.submit(
                prompt,
                max_new_tokens,
                sampling,
                n=num_samples,
                stop_ids=stops[i],
                seed=None if seed is None else seed + i,
            )
            ids.update({id(seq): i * num_samples + j for j, seq in enumerate(seqs)})
        while not batch.idle:
            events = batch.step()
            if batch.failed:
                seq = batch.failed[0]
                raise EngineError(f"sequence {ids[id(seq)]} could not be generated: {seq.error}")
            if events:
                yield sorted((ids[id(seq)], token) for seq, token in events)

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

    def check_prompt(self, prompt: Sequence[int], name: str = "the prompt") -> None:
        block = self.model.config.block_size
        if not prompt:
            raise EngineError(f"{name} is empty; start it with at least one token")
        if len(prompt) > block:
            raise EngineError(
                f"{name} has {len(prompt)} tokens, more than the model's context of "
                f"{block}; shorten it"
            )
        if not all(0 <= t < self.n_vocab for t in prompt):
            raise EngineError(f"{name} has token ids outside 0..{self.n_vocab - 1}")

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
