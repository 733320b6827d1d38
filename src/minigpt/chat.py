"""Talking to a model: a conversation's history kept within the context, and the REPL over it.

`ChatSession` owns the history and the system prompt, renders them with the tokenizer, drops the
oldest whole exchanges when the next reply would not fit the context, and streams the reply text
as the engine produces it (bytes decoded incrementally, so a character split across tokens
prints whole). `run_repl` is the terminal loop of `minigpt chat`.
"""

from __future__ import annotations

import codecs
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from minigpt.engine import Engine, Sampling
from minigpt.errors import MinigptError
from minigpt.tokenizer import Tokenizer

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"


class ChatError(MinigptError, ValueError):
    """A message the session cannot answer (e.g. longer than the context on its own)."""


class ChatSession:
    """A conversation with a model. Replies stop at any chat special token or `<|endoftext|>`.

    reply_tokens: the most tokens a reply may take; the prompt keeps that much of the context
    free (at most half of it), dropping the oldest exchanges as needed.
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        sampling: Sampling,
        reply_tokens: int = 256,
        seed: int | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.reply_tokens = reply_tokens
        self.seed = seed
        self.system: str | None = None
        self.history: list[dict[str, str]] = []
        self.replies = 0
        self.dropped = 0  # messages the last reply's prompt dropped to fit the context
        specials = (tokenizer.eot_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.end_id)
        self.stop_ids = set(specials)

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays."""
        self.history = []

    def set_system(self, text: str) -> None:
        self.system = text.strip() or None

    def reply(self, text: str) -> Iterator[str]:
        """The answer to the user message `text`, streamed as pieces of text; once it is
        complete, the exchange joins the history. Raises ChatError (at once) if `text` alone
        cannot fit the context."""
        messages, prompt = self._fit([*self.history, {"role": "user", "content": text}])
        self.dropped = len(self.history) + 1 - len(messages)
        return self._stream(messages, prompt)

    def _stream(self, messages: list[dict[str, str]], prompt: list[int]) -> Iterator[str]:
        seed = None if self.seed is None else self.seed + self.replies
        self.replies += 1
        ids: list[int] = []
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for step in self.engine.stream(
            [prompt], self.reply_tokens, self.sampling, stop_ids=self.stop_ids, seed=seed
        ):
            ((_, token),) = step
            if token in self.stop_ids:
                break
            ids.append(token)
            piece = decoder.decode(self.tokenizer.decode_bytes([token]))
            if piece:
                yield piece
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail
        self.history = [*messages, {"role": "assistant", "content": self.tokenizer.decode(ids)}]

    def _fit(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[int]]:
        """The newest messages whose prompt leaves room for a reply, and that prompt; the oldest
        user/assistant exchanges go first, the system prompt always stays."""
        block = self.engine.model.config.block_size
        budget = block - min(self.reply_tokens, block // 2)
        system = [{"role": "system", "content": self.system}] if self.system else []
        while True:
            prompt = self.tokenizer.render_for_completion(system + messages)
            if len(prompt) <= budget:
                return messages, prompt
            if len(messages) == 1:
                raise ChatError(
                    f"that message needs {len(prompt)} tokens with the system prompt; the "
                    f"context holds {budget} beside the reply. Shorten it."
                )
            messages = messages[2:]


def run_repl(session: ChatSession, read: Callable[[str], str] = input, out: TextIO | None = None):
    """Read a line, stream the reply, repeat; /reset, /system TEXT, /exit or end of input quit.
    `out` defaults to sys.stdout as it is at the call (not at import: tests swap it)."""
    out = out or sys.stdout
    out.write(f"{HELP}; Ctrl-D also exits\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            out.write("\n")
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            out.write("(conversation cleared)\n")
        elif line == "/system" or line.startswith("/system "):
            session.set_system(line[len("/system") :])
            session.reset()
            state = "set" if session.system else "cleared"
            out.write(f"(system prompt {state}; conversation cleared)\n")
        elif line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}; {HELP}\n")
        elif line:
            _answer(session, line, out)


def _answer(session: ChatSession, line: str, out: TextIO) -> None:
    try:
        pieces = session.reply(line)
    except ChatError as e:
        out.write(f"(not sent: {e})\n")
        return
    out.write("assistant> ")
    said = ""
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
            said += piece
    except KeyboardInterrupt:
        out.write("\n(interrupted; that exchange is forgotten)")
    else:
        if not said.strip():  # a blank line alone reads like a hang or a crash
            out.write("(empty reply: the model ended its turn at once)")
    out.write("\n")
    if session.dropped:
        out.write(f"(the oldest {session.dropped} messages were dropped to fit the context)\n")
