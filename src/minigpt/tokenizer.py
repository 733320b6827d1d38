"""The exact GPT-2 byte-level BPE, offline, through tiktoken; plus minigpt's chat special tokens.

The merge ranks ship inside the package (`assets/r50k_base.tiktoken.gz`, built by
`tools/build_assets.py` from OpenAI's `encoder.json` + `vocab.bpe`) and are checked against the
sha256 that tiktoken pins for r50k_base, so no network is ever needed and no other vocabulary can
sneak in.

Contract: `encode` treats every string as plain text. A user typing "<|END|>" gets the characters,
never the special id; special ids enter a sequence only through the named attributes
(`eot_id`, `user_id`, `assistant_id`, `end_id`) used by code that builds sequences on purpose.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
from functools import lru_cache
from importlib import resources

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


class TokenizerAssetError(MinigptError, RuntimeError):
    """The packaged vocabulary is not OpenAI's."""


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

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """Plain-text encoding of many texts on tiktoken's thread pool (it releases the GIL)."""
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)

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

    def describe(self) -> dict:
        """What a token shard manifest records about the tokenizer that made it."""
        return {
            "name": self.name,
            "ranks_sha256": self.ranks_sha256,
            "eot_id": self.eot_id,
            "n_vocab": self.n_vocab,
        }


@lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    return Tokenizer()
