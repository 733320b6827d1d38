"""Prompts for online RL: what the policy is asked, and what its reward functions may check.

`load_prompts(source, fmt)` yields `Prompt`s from
    prompts     a JSONL/JSON file of {"prompt": str or messages, <extra fields>} or
                {"messages": [...], <extra fields>} records; the messages end with a user turn
                (trailing assistant turns are dropped: the reply is the policy's to write);
                the extra fields (e.g. an "answer" for a verifiable reward) travel with the
                prompt to the reward functions
    hh-rlhf, trl    preference pairs: their prompt side
    alpaca, dolly, messages, chitchat   conversations: every user turn, with the turns before it
`Prompt.prompt` is what TRL hands a reward function: the record's string, or for every other
record the conversation as a list of {"role", "content"} messages.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from minigpt.data.chat import (
    HUB_FORMATS,
    PARSERS,
    ChatDataError,
    Conversation,
    MalformedRecord,
    describe_skipped,
    load_conversations,
    read_records,
    require_records,
)
from minigpt.data.preference import PAIR_PARSERS, PREFERENCE_HUB_FORMATS, fit_prompt
from minigpt.tokenizer import ConversationError, Tokenizer, check_conversation

PROMPT_FORMATS = ["prompts", *PAIR_PARSERS, *(f for f in PARSERS if f not in PAIR_PARSERS)]


class Prompt(NamedTuple):
    prompt: str | Conversation  # as reward functions receive it
    messages: Conversation  # the conversation the policy continues, ending with a user turn
    extra: dict  # the record's other fields


def parse_prompt_record(record: dict) -> Prompt:
    """A {"prompt": ...} or {"messages": [...]} record (see the module docstring)."""
    key = "prompt" if "prompt" in record else "messages" if "messages" in record else None
    if key is None:
        raise MalformedRecord('no "prompt" or "messages" field')
    value = record[key]
    extra = {k: v for k, v in record.items() if k != key}
    if isinstance(value, str):
        if not value.strip():
            raise MalformedRecord("empty prompt")
        return Prompt(value, [{"role": "user", "content": value}], extra)
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in value
    ):
        raise MalformedRecord(f'"{key}" is neither a string nor a list of messages')
    messages = [{"role": m.get("role"), "content": m["content"]} for m in value]
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise MalformedRecord("the messages do not end with a user turn")
    try:
        check_conversation(messages)
    except ConversationError as e:
        raise MalformedRecord(str(e)) from e
    return Prompt(messages, messages, extra)


def user_turns(conversation: Conversation) -> list[Prompt]:
    """Every user turn of a conversation, with the turns before it."""
    return [
        Prompt(conversation[: i + 1], conversation[: i + 1], {})
        for i, message in enumerate(conversation)
        if message["role"] == "user"
    ]


@dataclass
class PromptSet:
    source: str
    format: str
    prompts: list[Prompt] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        return f"{self.source} ({self.format}): {len(self.prompts)} prompts" + describe_skipped(
            self.skipped
        )


def load_prompts(
    source: str, fmt: str | None = None, *, split: str = "train", limit: int | None = None
) -> PromptSet:
    """Prompts from a hub name, a local .json/.jsonl file (format "prompts" unless told), or
    "chitchat". limit: read at most this many records."""
    fmt = (
        fmt
        or PREFERENCE_HUB_FORMATS.get(source)
        or HUB_FORMATS.get(source)
        or ("chitchat" if source == "chitchat" else None)
        or ("prompts" if source.endswith((".json", ".jsonl")) else None)
    )
    if fmt not in PROMPT_FORMATS:
        raise ChatDataError(
            f"{source}: unknown or missing format {fmt!r}; choose one of "
            f"{', '.join(PROMPT_FORMATS)}"
        )
    result = PromptSet(source, fmt)
    if fmt in PARSERS and fmt not in PAIR_PARSERS:
        loaded = load_conversations(source, fmt, split=split, limit=limit)
        result.skipped = loaded.skipped
        result.prompts = [p for c in loaded.conversations for p in user_turns(c)]
    else:
        parse = parse_prompt_record if fmt == "prompts" else PAIR_PARSERS[fmt]
        for n, record in enumerate(read_records(source, split)):
            if limit is not None and n >= limit:
                break
            try:
                if not isinstance(record, dict):
                    raise MalformedRecord("not a JSON object")
                parsed = parse(record)
                if fmt != "prompts":  # a preference pair: its prompt side
                    parsed = Prompt(parsed.prompt, parsed.prompt, {})
                result.prompts.append(parsed)
            except MalformedRecord as e:
                result.skipped[str(e)] += 1
    require_records(source, fmt, len(result.prompts), result.skipped, PROMPT_FORMATS)
    return result


def render_prompts(
    prompts: Sequence[Prompt], tokenizer: Tokenizer, budget: int
) -> tuple[list[Prompt], list[list[int]]]:
    """The prompts that fit in `budget` tokens (whole leading turns dropped as for preference
    pairs) and their ids, ending with `<|ASSISTANT|>`."""
    kept, ids = [], []
    for prompt in prompts:
        rendered, _ = fit_prompt(tokenizer, prompt.messages, budget)
        if len(rendered) <= budget:
            kept.append(prompt)
            ids.append(rendered)
    return kept, ids
