"""The exact GPT-2 byte-level BPE, offline, through tiktoken; plus minigpt's chat special tokens.

The merge ranks ship inside the package (`assets/r50k_base.tiktoken.gz`, built by
`tools/build_assets.py` from OpenAI's `encoder.json` + `vocab.bpe`) and are checked against the
sha256 that tiktoken pins for r50k_base, so no network is ever needed and no other vocabulary can
sneak in.

Contract: `encode` treats every string as plain text. A user typing "<|END|>" gets the characters,
never the special id; special ids enter a sequence only through the named attributes
(`eot_id`, `user_id`, `assistant_id`, `end_id`) used by code that builds sequences on purpose.

Conversations (lists of `{"role": "system"|"user"|"assistant", "content": str}`) render as
    <|USER|>user text<|END|><|ASSISTANT|>assistant text<|END|><|USER|>...
with nothing added between a special token and the text. A system message may only come first;
it has no token of its own and is merged into the first user message, `system + "\n\n" + user`
(alone, it renders as a user message). The loss mask is 1 exactly on assistant text and the
`<|END|>` that closes it: the model learns to answer and to stop, never to imitate the user.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import NamedTuple

import tiktoken

from minigpt.errors import MinigptError

RANKS_FILE = "r50k_base.tiktoken.gz"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's r50k_base pattern: GPT-2's original regex, written to run faster
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

EOT = "<|endoftext|>"
USER = "<|USER|>"
ASSISTANT = "<|ASSISTANT|>"
END = "<|END|>"
SPECIAL_TOKENS = {EOT: 50256, USER: 50257, ASSISTANT: 50258, END: 50259}


ROLES = ("system", "user", "assistant")


class TokenizerAssetError(MinigptError, RuntimeError):
    """The packaged vocabulary is not OpenAI's."""


class ConversationError(MinigptError, ValueError):
    """A conversation that cannot be rendered (unknown role, misplaced system message...)."""


class RenderedConversation(NamedTuple):
    """Token ids, their loss mask (1 = train on it), and how many messages were cut off the end
    to fit max_tokens (the whole conversation when not even its first exchange fits)."""

    ids: list[int]
    mask: list[int]
    dropped_messages: int


def load_gpt2_ranks() -> dict[bytes, int]:
    """OpenAI's GPT-2 merge ranks from the packaged file, verified by sha256."""
    blob = gzip.decompress(resources.files("minigpt.assets").joinpath(RANKS_FILE).read_bytes())
    digest = hashlib.sha256(blob).hexdigest()
    if digest != RANKS_SHA256:
        raise TokenizerAssetError(
            f"packaged {RANKS_FILE} has sha256 {digest}, expected {RANKS_SHA256} (OpenAI's "
            "r50k_base); reinstall minigpt or rebuild it with tools/build_assets.py"
        )
    ranks = {}
    for line in blob.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


class Tokenizer:
    """GPT-2 BPE with `<|endoftext|>` and the chat tokens `<|USER|>`, `<|ASSISTANT|>`, `<|END|>`."""

    name = "gpt2"
    ranks_sha256 = RANKS_SHA256

    def __init__(self) -> None:
        self._enc = tiktoken.Encoding(
            name="minigpt-gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=load_gpt2_ranks(),
            special_tokens=SPECIAL_TOKENS,
        )
        self.eot_id = SPECIAL_TOKENS[EOT]
        self.user_id = SPECIAL_TOKENS[USER]
        self.assistant_id = SPECIAL_TOKENS[ASSISTANT]
        self.end_id = SPECIAL_TOKENS[END]
        self.n_vocab = self._enc.n_vocab  # 50,260: GPT-2's 50,257 plus the three chat tokens

    def encode(self, text: str) -> list[int]:
        """Plain-text encoding: special-token strings in `text` are encoded as characters."""
        return self._enc.encode_ordinary(text)

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """As Hugging Face tokenizers encode: the special-token names in `text` become their
        ids. Only for tools that expect that (the server's /tokenize), never for user text that
        reaches the model."""
        return self._enc.encode(text, allowed_special="all")

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """Plain-text encoding of many texts on tiktoken's thread pool (it releases the GIL)."""
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def encode_to_numpy(self, text: str):
        """Plain-text encoding as a uint32 numpy array, never building a Python list (the fast
        path for bulk tokenization; tiktoken releases the GIL while it encodes)."""
        return self._enc.encode_to_numpy(text, disallowed_special=())

    def encode_documents_to_numpy(self, documents: list[str]):
        """`<|endoftext|>` + document tokens for each document, as one uint32 numpy array, in one
        tiktoken call (the shard layout). Exact only when no document contains the
        `<|endoftext|>` text itself (then it would become the special token): callers check."""
        text = EOT + EOT.join(documents)
        return self._enc.encode_to_numpy(text, allowed_special={EOT}, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special ids render as their names, invalid UTF-8 as U+FFFD."""
        return self._enc.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Raw bytes of `ids`, for streaming output that may split a UTF-8 character."""
        return self._enc.decode_bytes(ids)

    def special_id(self, name: str) -> int:
        """Id of a special token by its string, e.g. "<|END|>"."""
        if name not in SPECIAL_TOKENS:
            raise KeyError(f"{name!r} is not a special token; known: {', '.join(SPECIAL_TOKENS)}")
        return SPECIAL_TOKENS[name]

    def render_conversation(
        self, messages: Sequence[dict], max_tokens: int
    ) -> RenderedConversation:
        """Ids and loss mask of a conversation (format in the module docstring), at most
        max_tokens long. Longer conversations lose whole messages from the end, then any trailing
        non-assistant messages (they carry no loss), so what is kept ends with an answer."""
        segments = self._segments(messages)
        kept, length = 0, 0
        while kept < len(segments) and length + len(segments[kept][0]) <= max_tokens:
            length += len(segments[kept][0])
            kept += 1
        if kept < len(segments):
            while kept and not any(segments[kept - 1][1]):
                kept -= 1
        ids = [t for seg_ids, _, _ in segments[:kept] for t in seg_ids]
        mask = [m for _, seg_mask, _ in segments[:kept] for m in seg_mask]
        dropped = sum(n for _, _, n in segments[kept:])
        return RenderedConversation(ids, mask, dropped)

    def render_for_completion(self, messages: Sequence[dict]) -> list[int]:
        """Ids of a conversation that ends with a user message, then `<|ASSISTANT|>`: the prompt
        from which the model writes the next answer."""
        segments = self._segments(messages)
        if not segments or messages[-1]["role"] != "user":
            raise ConversationError("a conversation to complete must end with a user message")
        return [t for seg_ids, _, _ in segments for t in seg_ids] + [self.assistant_id]

    def _segments(self, messages: Sequence[dict]) -> list[tuple[list[int], list[int], int]]:
        """(ids, mask, number of messages) per rendered turn, the system message merged."""
        check_conversation(messages)
        segments = []
        system = None
        for message in messages:
            role, text = message["role"], message["content"]
            if role == "system":
                system = text
                continue
            n = 1
            if system is not None:
                if role == "user":
                    text, n = system + "\n\n" + text, 2
                else:
                    segments.append(self._turn(self.user_id, system, 0) + (1,))
                system = None
            opener = self.user_id if role == "user" else self.assistant_id
            segments.append(self._turn(opener, text, int(role == "assistant")) + (n,))
        if system is not None:
            segments.append(self._turn(self.user_id, system, 0) + (1,))
        return segments

    def _turn(self, opener: int, text: str, train: int) -> tuple[list[int], list[int]]:
        body = self.encode(text) + [self.end_id]
        return [opener] + body, [0] + [train] * len(body)

    def describe(self) -> dict:
        """What a token shard manifest records about the tokenizer that made it."""
        return {
            "name": self.name,
            "ranks_sha256": self.ranks_sha256,
            "eot_id": self.eot_id,
            "n_vocab": self.n_vocab,
        }


def check_conversation(messages: Sequence[dict]) -> None:
    """Raise ConversationError unless `messages` is a list of {"role", "content": str} dicts with
    known roles and a system message, if any, only first."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ConversationError(
            f"a conversation is a list of messages, not {type(messages).__name__}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ConversationError(
                f"message {i} is not a {{'role', 'content': str}} dict: {message!r:.80}"
            )
        if message.get("role") not in ROLES:
            raise ConversationError(
                f"message {i} has role {message.get('role')!r}; expected one of {', '.join(ROLES)}"
            )
        if message["role"] == "system" and i != 0:
            raise ConversationError(f"message {i}: a system message may only come first")


@lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    return Tokenizer()
