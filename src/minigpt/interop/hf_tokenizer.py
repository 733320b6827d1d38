"""Our tokenizer as Hugging Face tokenizer files, derived from the packaged GPT-2 merge ranks.

Writes GPT-2's slow-tokenizer files (`vocab.json` + `merges.txt`, the byte-level format of OpenAI's
`encoder.json` + `vocab.bpe`), a fast `tokenizer.json`, and `tokenizer_config.json` carrying
`CHAT_TEMPLATE`. The chat tokens are added tokens after GPT-2's 50,257, with our ids.

Contract: on text without special-token strings, the exported tokenizer encodes exactly as
`minigpt.tokenizer` does; applying `CHAT_TEMPLATE` and encoding gives the ids of our chat
rendering. Unlike `Tokenizer.encode`, a Hugging Face tokenizer turns "<|END|>" typed in text into
the special token: that is transformers' convention, and what makes its chat template work.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from minigpt.tokenizer import ASSISTANT, END, EOT, SPECIAL_TOKENS, USER, load_gpt2_ranks

# The chat format, rendered as transformers' chat template: an optional system message as plain
# text followed by a blank line, then `<|USER|>{content}<|END|>` and
# `<|ASSISTANT|>{content}<|END|>` per turn with nothing between them, and with
# add_generation_prompt a trailing `<|ASSISTANT|>`. It must match `render_conversation`.
CHAT_TEMPLATE = (
    # minigpt.tokenizer.render_conversation's format: a leading system message is merged into the
    # first user turn ("system\n\nuser"), or stands as a user turn of its own when no user
    # message follows it.
    "{%- set ns = namespace(system=none) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' and loop.first -%}"
    "{%- set ns.system = message['content'] -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '" + USER + "' }}"
    "{%- if ns.system is not none -%}{{ ns.system + '\\n\\n' }}{%- endif -%}"
    "{{ message['content'] + '" + END + "' }}"
    "{%- set ns.system = none -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if ns.system is not none -%}{{ '" + USER + "' + ns.system + '" + END + "' }}{%- endif -%}"
    "{%- set ns.system = none -%}"
    "{{ '" + ASSISTANT + "' + message['content'] + '" + END + "' }}"
    "{%- else -%}"
    "{{ raise_exception('unsupported role ' + message['role'] + ': a system message may only "
    "come first, then user and assistant turns') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.system is not none -%}{{ '" + USER + "' + ns.system + '" + END + "' }}{%- endif -%}"
    "{%- if add_generation_prompt -%}{{ '" + ASSISTANT + "' }}{%- endif -%}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, as in OpenAI's `encoder.py`: printable bytes map
    to themselves, the rest to code points from 256 up, so every token is a visible string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair merges of `token` using only ranks below `max_rank` (lowest rank first)."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


@lru_cache(maxsize=1)
def gpt2_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's `encoder.json` (with `<|endoftext|>`) and `vocab.bpe` merges, from the ranks.

    The merge that made a token is the two-part split BPE reaches using only earlier ranks.
    """
    ranks = load_gpt2_ranks()
    byte_char = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[EOT] = SPECIAL_TOKENS[EOT]
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _bpe_split(ranks, token, rank)
            merges.append((text(left), text(right)))
    return vocab, merges


def write_tokenizer_files(out_dir: str | os.PathLike, model_max_length: int) -> list[Path]:
    """Write vocab.json, merges.txt, tokenizer.json and tokenizer_config.json into `out_dir`."""
    out_dir = Path(out_dir)
    vocab, merges = gpt2_vocab_and_merges()
    files = {
        "vocab.json": json.dumps(vocab),  # byte for byte OpenAI's encoder.json
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(tokenizer_config(model_max_length), indent=2),
    }
    for name, content in files.items():
        (out_dir / name).write_text(content, encoding="utf-8")
    _fast_tokenizer(vocab, merges).save(str(out_dir / "tokenizer.json"))
    return [out_dir / name for name in (*files, "tokenizer.json")]


def _fast_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """GPT-2's byte-level BPE in the `tokenizers` library, plus our special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # added in id order, so they take ids 50256 (already in the vocab), 50257, 50258, 50259
    specials = sorted(SPECIAL_TOKENS, key=SPECIAL_TOKENS.get)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tokenizer


def tokenizer_config(model_max_length: int) -> dict:
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "pad_token": EOT,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
