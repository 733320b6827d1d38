"""Token ids to streamed text: never half a UTF-8 character, never part of a stop string.

GPT-2's byte-level tokens can split one character across several tokens, so bytes are decoded
incrementally and an incomplete character waits for the rest. A stop string may arrive over
several tokens too: text that could still be the start of one is held back until the next
tokens show whether it is; once a stop string appears, the text before it is all that is sent.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from minigpt.tokenizer import Tokenizer


class TextStream:
    """Feed a sequence's token ids one at a time; get the text that is safe to send."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far (up to a stop string, once one is seen)
        self.sent = 0  # characters of `text` already returned
        self.stopped = False  # a stop string was found: nothing more will be sent

    def push(self, token: int) -> str:
        """The new text that can be sent after `token` ("" while held back)."""
        if self.stopped:
            return ""
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        return self._release(final=False)

    def finish(self) -> str:
        """The held-back rest once the sequence has ended."""
        if self.stopped:
            return ""
        self.text += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        longest = max(map(len, self.stop), default=0)
        search_from = max(0, self.sent - longest + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._held_back()
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest end of the text that begins a stop string."""
        for n in range(min(len(self.text), max(map(len, self.stop), default=1) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
