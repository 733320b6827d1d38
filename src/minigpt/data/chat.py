"""Conversation datasets -> conversations -> rendered (ids, mask) examples -> SFT batches.

One interface, `load_conversations(source, fmt)`, over one small parser per format. A parser turns
one record of the dataset's real schema into a conversation, a list of
`{"role": "system"|"user"|"assistant", "content": str}`, or raises `MalformedRecord` with the reason;
malformed records are counted by reason and reported, never silently mangled.

Formats (and their records):
    hh-rlhf    Anthropic/hh-rlhf: {"chosen": str, "rejected": str}, dialogues of
               "\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns; the chosen one is used
    alpaca     tatsu-lab/alpaca: {"instruction", "input", "output"} (input may be empty)
    dolly      databricks/databricks-dolly-15k: {"instruction", "context", "response", "category"}
    messages   generic chat JSONL: {"messages": [{"role", "content"}...]} (OpenAI) or
               {"conversations": [{"from", "value"}...]} (ShareGPT: human/gpt/system)
    chitchat   the chitchat-dataset package's dataset.json: {id: {"messages": [[{"sender",
               "text", "timestamp"}...]...], ...}}, groups of lines by one sender; two
               alternating speakers become user (the first) and assistant
Sources: a hub name (through `datasets`), a local .json / .jsonl file, or "chitchat" for the
installed package's file.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minigpt.errors import MinigptError
from minigpt.model import IGNORE_INDEX
from minigpt.tokenizer import Tokenizer

Conversation = list[dict[str, str]]
HUB_FORMATS = {
    "Anthropic/hh-rlhf": "hh-rlhf",
    "tatsu-lab/alpaca": "alpaca",
    "databricks/databricks-dolly-15k": "dolly",
}
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class ChatDataError(MinigptError, ValueError):
    """A conversation source that cannot be read at all (missing file, unknown format...)."""


class MalformedRecord(ValueError):
    """One record that does not fit its format; the message is the reason it is counted under."""


# ---------------------------------------------------------------------------------------- parsers
def _text(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key, "" if not required else None)
    if not isinstance(value, str):
        raise MalformedRecord(f"'{key}' missing or not a string")
    if required and not value.strip():
        raise MalformedRecord(f"'{key}' empty")
    return value.strip()


def _prompt_response(instruction: str, extra: str, response: str) -> Conversation:
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": response}]


def parse_alpaca(record: dict) -> Conversation:
    return _prompt_response(
        _text(record, "instruction"), _text(record, "input", False), _text(record, "output")
    )


def parse_dolly(record: dict) -> Conversation:
    return _prompt_response(
        _text(record, "instruction"), _text(record, "context", False), _text(record, "response")
    )


HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_rlhf(record: dict) -> Conversation:
    """The `chosen` dialogue (see `parse_hh_dialogue`)."""
    return parse_hh_dialogue(record, "chosen")


def parse_hh_dialogue(record: dict, key: str) -> Conversation:
    """`record[key]` as a conversation: Human and Assistant turns alternating, Human first,
    ending with a non-empty Assistant turn. Split on the turn markers only."""
    text = record.get(key)
    if not isinstance(text, str):
        raise MalformedRecord(f"'{key}' missing or not a string")
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise MalformedRecord("text before the first Human: turn")
    conversation = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        if (not conversation and role != "user") or (
            conversation and conversation[-1]["role"] == role
        ):
            raise MalformedRecord("Human/Assistant turns do not alternate")
        conversation.append({"role": role, "content": content.strip()})
    if not conversation or conversation[-1]["role"] != "assistant":
        raise MalformedRecord("does not end with an Assistant turn")
    if not all(m["content"] for m in conversation):
        raise MalformedRecord("empty turn")
    return conversation


def parse_messages(record: dict) -> Conversation:
    """OpenAI {"messages": [{"role", "content"}]} or ShareGPT {"conversations": [{"from",
    "value"}]} (either key, either message shape)."""
    messages = record.get("messages", record.get("conversations"))
    if not isinstance(messages, list) or not messages:
        raise MalformedRecord("no 'messages' / 'conversations' list")
    conversation = []
    for message in messages:
        if not isinstance(message, dict):
            raise MalformedRecord("a message is not an object")
        role = SHAREGPT_ROLES.get(message.get("role", message.get("from")))
        content = message.get("content", message.get("value"))
        if role is None or not isinstance(content, str):
            raise MalformedRecord("a message without a known role and string content")
        conversation.append({"role": role, "content": content.strip()})
    check_turns(conversation)
    return conversation


def parse_chitchat(record: dict) -> Conversation:
    """Groups of lines, each group by one sender; the first sender is the user. Blank lines are
    dropped and a sender's consecutive groups merged."""
    groups = record.get("messages")
    if not isinstance(groups, list):
        raise MalformedRecord("no 'messages' list")
    speakers: list[str] = []
    conversation: Conversation = []
    for group in groups:
        try:
            senders = {line["sender"] for line in group}
            text = "\n".join(line["text"].strip() for line in group if line["text"].strip())
        except (TypeError, KeyError, AttributeError):
            raise MalformedRecord("a line without 'sender' and 'text'") from None
        if len(senders) != 1:
            raise MalformedRecord("a message group with no or several senders")
        if not text:  # a few groups hold only blank lines: nothing was said
            continue
        (sender,) = senders
        if sender not in speakers:
            speakers.append(sender)
        if len(speakers) > 2:
            raise MalformedRecord("more than two speakers")
        role = "user" if sender == speakers[0] else "assistant"
        if conversation and conversation[-1]["role"] == role:
            conversation[-1]["content"] += "\n" + text
        else:
            conversation.append({"role": role, "content": text})
    if len(speakers) < 2:
        raise MalformedRecord("only one speaker")
    check_turns(conversation)
    return conversation


def check_turns(conversation: Conversation) -> None:
    """Usable for SFT: an optional system message, then user first, roles alternating,
    no empty message, and at least one answer."""
    turns = conversation[1:] if conversation[0]["role"] == "system" else conversation
    if any(m["role"] == "system" for m in turns):
        raise MalformedRecord("a system message after the start")
    if any(not m["content"] for m in turns):
        raise MalformedRecord("empty message")
    roles = [m["role"] for m in turns]
    if roles[:1] != ["user"] or any(a == b for a, b in zip(roles, roles[1:], strict=False)):
        raise MalformedRecord("user/assistant turns do not alternate from the user")
    if "assistant" not in roles:
        raise MalformedRecord("no assistant message")


PARSERS: dict[str, Callable[[dict], Conversation]] = {
    "hh-rlhf": parse_hh_rlhf,
    "alpaca": parse_alpaca,
    "dolly": parse_dolly,
    "messages": parse_messages,
    "chitchat": parse_chitchat,
}


# ---------------------------------------------------------------------------------------- sources
def describe_skipped(skipped: Counter) -> str:
    """The tail of a summary line: ", N records skipped (n reason, ...)", or "" if none were."""
    if not skipped:
        return ""
    reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
    return f", {sum(skipped.values())} records skipped ({reasons})"


def require_records(source: str, fmt: str, kept: int, skipped: Counter, formats) -> None:
    """The check that a source gave something to train on: when it gave nothing, a
    ChatDataError saying why (every record skipped: the commonest reasons and their counts, and
    the `data.format` values there are; or no records at all)."""
    if kept:
        return
    if not skipped:
        raise ChatDataError(f"{source}: no records to read")
    reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common(3))
    if len(skipped) > 3:
        reasons += f", {sum(skipped.values()) - sum(n for _, n in skipped.most_common(3))} other"
    raise ChatDataError(
        f"{source}: all {sum(skipped.values())} records skipped as data.format={fmt!r} "
        f"({reasons}); set data.format to the file's format: {', '.join(formats)}"
    )


@dataclass
class ConversationSet:
    """The conversations read from a source, and the records skipped, counted by reason."""

    source: str
    format: str
    conversations: list[Conversation] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        text = f"{self.source} ({self.format}): {len(self.conversations)} conversations"
        return text + describe_skipped(self.skipped)

    def require_some(self) -> ConversationSet:
        """Itself, or a ChatDataError when no record could be read (`require_records`)."""
        require_records(self.source, self.format, len(self.conversations), self.skipped, PARSERS)
        return self


def load_conversations(
    source: str, fmt: str | None = None, *, split: str = "train", limit: int | None = None
) -> ConversationSet:
    """Conversations from a hub dataset name, a local .json/.jsonl file, or "chitchat".

    fmt: one of PARSERS; inferred for the known hub names and "chitchat", required otherwise.
    limit: stop after this many records (read, not kept).
    """
    fmt = fmt or HUB_FORMATS.get(source) or ("chitchat" if source == "chitchat" else None)
    if fmt not in PARSERS:
        raise ChatDataError(
            f"{source}: unknown or missing format {fmt!r}; choose one of {', '.join(PARSERS)}"
        )
    result = ConversationSet(source, fmt)
    for n, record in enumerate(read_records(source, split)):
        if limit is not None and n >= limit:
            break
        try:
            if not isinstance(record, dict):
                raise MalformedRecord("not a JSON object")
            result.conversations.append(PARSERS[fmt](record))
        except MalformedRecord as e:
            result.skipped[str(e)] += 1
    return result


def read_records(source: str, split: str = "train") -> Iterator:
    """Raw records: JSON lines (an unparseable line yields None, counted as malformed), a JSON
    list or object of records, the installed chitchat file, or a hub dataset split."""
    path = chitchat_path() if source == "chitchat" else Path(source)
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".json":
        yield from _read_json(path)
    elif path.exists():
        raise ChatDataError(f"{path}: expected a .json or .jsonl file")
    else:
        yield from _hub_records(source, split)


def _read_jsonl(path: Path) -> Iterator[dict | None]:
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        yield None
    except OSError as e:
        raise ChatDataError(f"{path}: cannot read ({e.strerror})") from e


def _read_json(path: Path) -> Iterator:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ChatDataError(f"{path}: cannot read ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise ChatDataError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, dict):  # chitchat: records keyed by conversation id
        data = list(data.values())
    if not isinstance(data, list):
        raise ChatDataError(f"{path}: expected a JSON list or object of records")
    yield from data


def _hub_records(name: str, split: str) -> Iterator[dict]:
    if not HUB_NAME.fullmatch(name):
        raise ChatDataError(f"{name}: no such file, and not a hub dataset name (owner/name)")
    try:
        import datasets
    except ImportError:
        raise ChatDataError(f"{name}: hub datasets need `pip install minigpt[hf]`") from None
    try:
        records = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, access and missing-split errors come in many types
        raise ChatDataError(f"{name}: cannot load split {split!r} from the hub ({e})") from e
    yield from records


def chitchat_path() -> Path:
    """dataset.json of the installed chitchat-dataset package (found without importing it)."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ChatDataError(
            "chitchat-dataset is not installed: `pip install chitchat-dataset==0.9.0`, or pass "
            "the path of its chitchat_dataset/dataset.json with --format chitchat"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "dataset.json"


# ------------------------------------------------------------------------------------- SFT batches
@dataclass
class RenderStats:
    """What fitting conversations into max_tokens cost: conversations cut short, messages cut,
    and conversations left out because not even their first answer fits."""

    truncated: int = 0
    dropped_messages: int = 0
    left_out: int = 0


def render_for_sft(
    conversations: Sequence[Conversation], tokenizer: Tokenizer, max_tokens: int
) -> tuple[list[tuple[list[int], list[int]]], RenderStats]:
    """(ids, mask) examples for `collate_sft`, each at most max_tokens long (whole messages
    kept, see Tokenizer.render_conversation), and what truncation cost."""
    examples, stats = [], RenderStats()
    for conversation in conversations:
        ids, mask, dropped = tokenizer.render_conversation(conversation, max_tokens)
        stats.dropped_messages += dropped
        if not any(mask):
            stats.left_out += 1
            continue
        stats.truncated += dropped > 0
        examples.append((ids, mask))
    return examples, stats


def length_buckets(max_len: int, floor: int = 64) -> tuple[int, ...]:
    """The lengths a compiled model is fed fine-tuning batches at, ascending: powers of two from
    `floor` while below `max_len`, then `max_len` (64, 128, 256, 512, 1024 for a 1024-token
    context). Each is one compiled graph; a batch pads to less than twice its length (or to
    `floor`)."""
    lengths, length = [], floor
    while length < max_len:
        lengths.append(length)
        length *= 2
    return (*lengths, max_len)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest of the ascending `buckets` that holds `length`; `length` when none does."""
    return next((bucket for bucket in buckets if bucket >= length), length)


def collate_sft(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    buckets: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered (ids, mask) pairs -> (inputs, targets), (B, T) int64 padded on the right to the
    longest example less one token, or further to the bucket that holds it (`bucket_length`):
    targets are the next ids, IGNORE_INDEX wherever that next token's mask is 0 or is padding,
    so the model's loss is the masked cross-entropy, whatever the padding (causal attention never
    lets a real token see the padding after it). pad_id fills inputs past an example's end (e.g.
    eot_id); it is never a target."""
    if not examples or any(len(ids) != len(mask) for ids, mask in examples):
        raise ChatDataError("collate_sft needs examples with one mask entry per id")
    if any(len(ids) < 2 for ids, _ in examples):
        raise ChatDataError("collate_sft needs examples of 2+ tokens; drop empty renderings")
    T = bucket_length(max(len(ids) for ids, _ in examples) - 1, buckets)
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        inputs[row, :n] = torch.tensor(ids[:-1], dtype=torch.long)
        next_ids = torch.tensor(ids[1:], dtype=torch.long)
        trained = torch.tensor(mask[1:], dtype=torch.bool)
        targets[row, :n] = next_ids.masked_fill(~trained, IGNORE_INDEX)
    return inputs, targets
