"""Preference datasets -> (prompt, chosen, rejected) pairs -> rendered ids -> DPO micro-batches.

One interface, `load_preferences(source, fmt)`, yields `PreferencePair`s: the prompt as a
conversation ending with a user message, and two candidate assistant replies. One small parser
per format turns a record of the dataset's real schema into a pair, or raises `MalformedRecord`
with the reason; skipped records are counted by reason and reported.

Formats (and their records):
    hh-rlhf    Anthropic/hh-rlhf: {"chosen": str, "rejected": str}, two whole transcripts of
               "\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns. The prompt is every turn before
               the final Assistant turn and must be the same in both. Transcripts are split on the
               turn markers, never on their common character prefix: that would move the first
               words the two replies share into the prompt.
    trl        TRL's preference convention (also HuggingFaceH4/ultrafeedback_binarized):
               {"prompt", "chosen", "rejected"}, each a string or a list of {"role", "content"}
               messages. A prompt string is one user message. A chosen/rejected list ends with
               the assistant reply; messages before it must repeat the prompt (UltraFeedback
               does), or are the prompt when "prompt" is absent (TRL's implicit prompt).
    alpaca, dolly, messages, chitchat (any conversation format of minigpt.data.chat):
               offline pairs built from conversations, for the CPU demo and tests. Each
               conversation gives one pair cut at a seeded-random assistant turn: chosen is the
               reply that was really given, rejected is the reply cut from another conversation.
               They teach the mechanics of preference tuning (prefer the reply that fits the
               context), not helpfulness or harmlessness.

Rendering uses the SFT chat template: the prompt ends with `<|ASSISTANT|>` and each reply is its
text and `<|END|>`; only reply tokens are ever targets (see `collate_pairs`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from minigpt.data.chat import (
    HUB_FORMATS,
    PARSERS,
    SHAREGPT_ROLES,
    ChatDataError,
    Conversation,
    MalformedRecord,
    check_turns,
    collate_sft,
    describe_skipped,
    load_conversations,
    parse_hh_dialogue,
    read_records,
    require_records,
)
from minigpt.tokenizer import Tokenizer

PREFERENCE_HUB_FORMATS = {
    "Anthropic/hh-rlhf": "hh-rlhf",
    "HuggingFaceH4/ultrafeedback_binarized": "trl",
    "trl-lib/ultrafeedback_binarized": "trl",
}
IDENTICAL = "chosen and rejected replies are identical"  # no preference to learn from
# how offline pairs from conversations get their rejected reply (see mismatched_pairs)
OFFLINE_REJECTED = ("other", "shuffled")


class PreferencePair(NamedTuple):
    prompt: Conversation  # ends with a user message
    chosen: str
    rejected: str


# ---------------------------------------------------------------------------------------- parsers
def _checked(prompt: Conversation, chosen: str, rejected: str) -> PreferencePair:
    """The pair, if prompt + either reply is a well-formed conversation and the replies differ."""
    for reply in (chosen, rejected):
        check_turns([*prompt, {"role": "assistant", "content": reply}])
    if chosen == rejected:
        raise MalformedRecord(IDENTICAL)
    return PreferencePair(prompt, chosen, rejected)


def parse_hh_rlhf_pair(record: dict) -> PreferencePair:
    chosen = parse_hh_dialogue(record, "chosen")
    rejected = parse_hh_dialogue(record, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise MalformedRecord("prompts differ")
    return _checked(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


def _messages(value: object, key: str) -> Conversation:
    if not isinstance(value, list) or not value:
        raise MalformedRecord(f"'{key}' is not a string or a non-empty message list")
    messages = []
    for message in value:
        role = SHAREGPT_ROLES.get(message.get("role")) if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role is None or not isinstance(content, str):
            raise MalformedRecord(f"a '{key}' message without a known role and string content")
        messages.append({"role": role, "content": content.strip()})
    return messages


def _reply(record: dict, key: str) -> tuple[Conversation, str]:
    """(the messages before the reply, the reply) of record[key]."""
    value = record.get(key)
    if isinstance(value, str):
        return [], value.strip()
    messages = _messages(value, key)
    if messages[-1]["role"] != "assistant":
        raise MalformedRecord(f"'{key}' does not end with an assistant message")
    return messages[:-1], messages[-1]["content"]


def parse_trl_pair(record: dict) -> PreferencePair:
    (chosen_head, chosen), (rejected_head, rejected) = (
        _reply(record, "chosen"),
        _reply(record, "rejected"),
    )
    prompt = record.get("prompt")
    if prompt is None:
        if chosen_head != rejected_head:
            raise MalformedRecord("prompts differ")
        prompt = chosen_head
    elif isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt.strip()}]
    else:
        prompt = _messages(prompt, "prompt")
    if any(head and head != prompt for head in (chosen_head, rejected_head)):
        raise MalformedRecord("prompts differ")
    if not prompt:
        raise MalformedRecord("no prompt")
    return _checked(prompt, chosen, rejected)


PAIR_PARSERS = {"hh-rlhf": parse_hh_rlhf_pair, "trl": parse_trl_pair}
# what data.format may be: a pair format, or a conversation format (offline pairs)
FORMATS = [*PAIR_PARSERS, *(f for f in PARSERS if f not in PAIR_PARSERS)]


# ---------------------------------------------------------------------------------------- sources
@dataclass
class PreferenceSet:
    """The pairs read from a source, and the records skipped, counted by reason."""

    source: str
    format: str
    pairs: list[PreferencePair] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    rejected: str = "other"  # offline pairs only: see mismatched_pairs

    def summary(self) -> str:
        text = f"{self.source} ({self.format}): {len(self.pairs)} preference pairs"
        if self.format not in PAIR_PARSERS:
            worse = {"other": "another conversation's", "shuffled": "its words shuffled"}
            text += f" (offline: chosen = the real reply, rejected = {worse[self.rejected]})"
        return text + describe_skipped(self.skipped)

    def require_some(self) -> PreferenceSet:
        """Itself, or a ChatDataError when no pair could be read (`require_records`)."""
        require_records(self.source, self.format, len(self.pairs), self.skipped, FORMATS)
        return self


def load_preferences(
    source: str,
    fmt: str | None = None,
    *,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    rejected: str = "other",
) -> PreferenceSet:
    """Pairs from a hub dataset name, a local .json/.jsonl file, or "chitchat".

    fmt: one of PAIR_PARSERS, or a conversation format (offline pairs, drawn with `seed`, their
    rejected reply as `rejected` says: see `mismatched_pairs`); inferred for the known hub names
    and "chitchat". limit: read at most this many records.
    """
    fmt = (
        fmt
        or PREFERENCE_HUB_FORMATS.get(source)
        or HUB_FORMATS.get(source)
        or ("chitchat" if source == "chitchat" else None)
    )
    if fmt not in FORMATS:
        raise ChatDataError(
            f"{source}: unknown or missing format {fmt!r}; choose one of {', '.join(FORMATS)}"
        )
    if fmt not in PAIR_PARSERS:
        loaded = load_conversations(source, fmt, split=split, limit=limit)
        result = PreferenceSet(source, fmt, skipped=loaded.skipped, rejected=rejected)
        result.pairs = mismatched_pairs(loaded.conversations, seed, result.skipped, rejected)
        return result
    result = PreferenceSet(source, fmt)
    for n, record in enumerate(read_records(source, split)):
        if limit is not None and n >= limit:
            break
        try:
            if not isinstance(record, dict):
                raise MalformedRecord("not a JSON object")
            result.pairs.append(PAIR_PARSERS[fmt](record))
        except MalformedRecord as e:
            result.skipped[str(e)] += 1
    return result


def mismatched_pairs(
    conversations: Sequence[Conversation],
    seed: int,
    skipped: Counter | None = None,
    rejected: str = "other",
) -> list[PreferencePair]:
    """One pair per conversation, in their order: the conversation up to a seeded-random
    assistant turn is the prompt, that turn is chosen, and the rejected reply is (`rejected`)
    "other": the turn cut the same way from the conversation after it in a seeded shuffle, or
    "shuffled": the chosen reply's own words in a seeded random order. Pairs whose replies are
    equal (two conversations answering "hi", a one-word reply) are counted in `skipped` and left
    out."""
    if rejected not in OFFLINE_REJECTED:
        raise ChatDataError(
            f"data.rejected={rejected!r}; choose one of {', '.join(OFFLINE_REJECTED)}"
        )
    if len(conversations) < 2:
        raise ChatDataError("offline preference pairs need at least two conversations")
    rng = np.random.default_rng(seed)
    cuts = []
    for conversation in conversations:
        answers = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
        cuts.append(answers[rng.integers(len(answers))])
    order = rng.permutation(len(conversations))
    other = np.empty_like(order)
    other[order] = np.roll(order, -1)  # each conversation's successor in the shuffled order
    pairs = []
    for i, (conversation, cut) in enumerate(zip(conversations, cuts, strict=True)):
        j = int(other[i])
        reply = conversation[cut]["content"]
        if rejected == "shuffled":
            words = reply.split()
            worse = " ".join(words[k] for k in rng.permutation(len(words)))
        else:
            worse = conversations[j][cuts[j]]["content"]
        try:
            pairs.append(_checked(conversation[:cut], reply, worse))
        except MalformedRecord as e:
            if skipped is not None:
                skipped[str(e)] += 1
    return pairs


# -------------------------------------------------------------------------------------- rendering
class RenderedPair(NamedTuple):
    prompt: list[int]  # the chat-rendered prompt, ending with <|ASSISTANT|>
    chosen: list[int]  # reply ids and <|END|> (cut short if the context is full)
    rejected: list[int]
    # the reference model's summed log-probs of (chosen, rejected), once computed
    reference: tuple[float, float] | None = None


@dataclass
class PairRenderStats:
    """What fitting pairs into max_tokens cost: prompts that lost leading turns, pairs with a
    reply cut short, and pairs dropped because their last user turn alone fills the context."""

    prompt_cut: int = 0
    reply_cut: int = 0
    dropped: int = 0


def fit_prompt(tokenizer: Tokenizer, prompt: Conversation, budget: int) -> tuple[list[int], bool]:
    """The prompt rendered whole if it fits in `budget`, else from the earliest user turn from
    which it does (the last user turn alone when none does); and whether turns were dropped."""
    ids = tokenizer.render_for_completion(prompt)
    if len(ids) <= budget:
        return ids, False
    starts = [i for i, m in enumerate(prompt) if m["role"] == "user" and i > 0]
    if not starts:
        return ids, False
    best = tokenizer.render_for_completion(prompt[starts[-1] :])
    for start in reversed(starts[:-1]):  # grow from the end while it still fits
        longer = tokenizer.render_for_completion(prompt[start:])
        if len(longer) > budget:
            break
        best = longer
    return best, True


def render_pairs(
    pairs: Sequence[PreferencePair], tokenizer: Tokenizer, max_tokens: int
) -> tuple[list[RenderedPair], PairRenderStats]:
    """Pairs rendered so that prompt + either reply is at most max_tokens ids: the prompt loses
    whole turns from the left until the longer reply fits (down to the last user turn), then
    replies are cut to the room left. Pairs with no room for one reply token are dropped."""
    rendered, stats = [], PairRenderStats()
    for pair in pairs:
        replies = [tokenizer.encode(r) + [tokenizer.end_id] for r in (pair.chosen, pair.rejected)]
        prompt, cut = fit_prompt(tokenizer, pair.prompt, max_tokens - max(map(len, replies)))
        room = max_tokens - len(prompt)
        if room < 1:
            stats.dropped += 1
            continue
        stats.prompt_cut += cut
        stats.reply_cut += any(len(r) > room for r in replies)
        rendered.append(RenderedPair(prompt, replies[0][:room], replies[1][:room]))
    return rendered, stats


def collate_pairs(
    pairs: Sequence[RenderedPair], pad_id: int, buckets: Sequence[int] = ()
) -> tuple[torch.Tensor, ...]:
    """B pairs -> (inputs, targets) of 2B rows, the B chosen sequences then the B rejected ones,
    right-padded (to the bucket that holds them, as `collate_sft` pads), with targets only on
    reply tokens (IGNORE_INDEX on the prompt and padding); then (2B,) float32 reference
    log-probs in the same row order when every pair has them."""
    rows = [(p.prompt + p.chosen, [0] * len(p.prompt) + [1] * len(p.chosen)) for p in pairs]
    rows += [(p.prompt + p.rejected, [0] * len(p.prompt) + [1] * len(p.rejected)) for p in pairs]
    inputs, targets = collate_sft(rows, pad_id, buckets)
    if any(p.reference is None for p in pairs):
        return inputs, targets
    reference = [p.reference[0] for p in pairs] + [p.reference[1] for p in pairs]
    return inputs, targets, torch.tensor(reference, dtype=torch.float32)


def fingerprint(pairs: Sequence[RenderedPair]) -> str:
    """sha256 of the pairs' token ids, to tell whether stored reference log-probs belong to them."""
    digest = hashlib.sha256()
    for pair in pairs:
        for ids in pair[:3]:
            digest.update(np.asarray([len(ids), *ids], dtype=np.int64).tobytes())
    return digest.hexdigest()
