"""The engine's token logprobs in OpenAI's two shapes: chat's `logprobs.content` (one entry per
token, with its bytes and top alternatives) and the completions API's legacy columns (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`), which lm-evaluation-harness reads to score.

A token is named by its text when its bytes are whole UTF-8, else `bytes:\\xNN...` (OpenAI's
convention), so two tokens never share a name in a `top_logprobs` dict.
"""

from __future__ import annotations

import codecs

from minigpt.engine import TokenLogprob
from minigpt.tokenizer import Tokenizer


def token_name(tokenizer: Tokenizer, token: int) -> str:
    raw = tokenizer.decode_bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def chat_entry(tokenizer: Tokenizer, scored: TokenLogprob) -> dict:
    """One token of chat's `logprobs.content`."""

    def item(token: int, logprob: float) -> dict:
        name = token_name(tokenizer, token)
        return {"token": name, "logprob": logprob, "bytes": list(tokenizer.decode_bytes([token]))}

    top = [item(t, lp) for t, lp in scored.top]
    return {**item(scored.token, scored.logprob), "top_logprobs": top}


class LegacyLogprobs:
    """The completions API's logprobs of one choice, built token by token. `text_offset` is
    each token's first character in the choice's text (the echoed prompt's tokens included);
    a token with no logprob (the first of a prompt: nothing predicts it) has None in
    `token_logprobs` and `top_logprobs`; each `top_logprobs` dict holds the alternatives asked
    for and the token itself."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.columns: dict[str, list] = {
            "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []
        }  # fmt: skip
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._offset = 0

    def __len__(self) -> int:
        return len(self.columns["tokens"])

    def add(self, token: int, scored: TokenLogprob | None) -> None:
        name = lambda t: token_name(self.tokenizer, t)  # noqa: E731
        top = None
        if scored is not None:
            top = {name(t): lp for t, lp in scored.top}
            top[name(token)] = scored.logprob
        self.columns["tokens"].append(name(token))
        self.columns["token_logprobs"].append(None if scored is None else scored.logprob)
        self.columns["top_logprobs"].append(top)
        self.columns["text_offset"].append(self._offset)
        self._offset += len(self._decoder.decode(self.tokenizer.decode_bytes([token])))

    def since(self, start: int) -> dict[str, list]:
        """The columns from entry `start` on (a streamed chunk's part)."""
        return {key: column[start:] for key, column in self.columns.items()}
