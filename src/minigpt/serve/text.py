"""Token ids to streamed text: never half a UTF-8 character, never part of a stop string.

GPT-2's byte-level tokens can split one character across several tokens, so bytes are decoded
incrementally and an incomplete character waits for the rest. A stop string may arrive over
several tokens too: text that could still be the start of one is held back until the next
tokens show whether it is; once a stop string appears, the text before it is all that is sent.

The work per token is linear in its new characters: each stop string has a matcher (KMP) that
knows how much of it the text ends with, so only the held-back tail is kept, never re-searched.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from minigpt.tokenizer import Tokenizer


class StopMatcher:
    """How many leading characters of `stop` the text fed so far ends with (Knuth-Morris-Pratt:
    amortized O(1) per character)."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        # fallback[k]: the longest proper prefix of stop[:k + 1] that is also its suffix
        self.fallback = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fallback[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fallback[i] = k
        self.matched = 0

    def feed(self, char: str) -> bool:
        """Add one character; True once the text ends with the whole stop string."""
        k = self.matched
        while k and self.stop[k] != char:
            k = self.fallback[k - 1]
        if self.stop[k] == char:
            k += 1
        self.matched = k
        return k == len(self.stop)


class TextStream:
    """Feed a sequence's token ids one at a time; get the text that is safe to send."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.matchers = [StopMatcher(s) for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""  # decoded, not yet sent: it could be the start of a stop string
        self.stopped = False  # a stop string was found: nothing more will be sent

    def push(self, token: int) -> str:
        """The new text that can be sent after `token` ("" while held back)."""
        if self.stopped:
            return ""
        return self._release(self.decoder.decode(self.tokenizer.decode_bytes([token])))

    def finish(self) -> str:
        """The held-back rest once the sequence has ended."""
        if self.stopped:
            return ""
        piece = self._release(self.decoder.decode(b"", final=True))
        rest, self.held = self.held, ""
        return piece + rest

    def _release(self, new: str) -> str:
        text = self.held + new
        if not self.matchers:
            self.held = ""
            return text
        for i, char in enumerate(new, start=len(self.held)):
            for m in self.matchers:
                if m.feed(char):  # the first stop string to appear ends the text
                    self.stopped, self.held = True, ""
                    return text[: i + 1 - len(m.stop)]
        # the longest end of the text that begins a stop string waits for the next tokens
        keep = max(m.matched for m in self.matchers)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]
