"""The chat session (history within the context, streamed replies) and the REPL in a terminal."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from minigpt.chat import ChatError, ChatSession
from minigpt.checkpoints import save_model
from minigpt.engine import Engine, Sampling
from minigpt.model import GPT
from minigpt.tokenizer import get_tokenizer
from tests.conftest import SRC, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = Sampling(temperature=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(tiny_config(block_size=64)).eval()


@pytest.fixture
def session(model):
    return ChatSession(Engine(model, 50260), get_tokenizer(), GREEDY, reply_tokens=8)


def test_reply_streams_what_the_engine_generates_and_joins_the_history(session, model):
    tok = get_tokenizer()
    prompt = tok.render_for_completion([{"role": "user", "content": "Hello there"}])
    expected = Engine(model, 50260).generate([prompt], 8, GREEDY, stop_ids=session.stop_ids)[0]
    expected = [t for t in expected if t not in session.stop_ids]
    reply = "".join(session.reply("Hello there"))
    assert reply == tok.decode(expected)
    assert session.history == [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": reply},
    ]
    session.reset()
    assert session.history == []


def test_oldest_whole_exchanges_are_dropped_to_fit_the_context(session):
    tok = get_tokenizer()
    session.set_system("Be brief.")
    sent = [f"message number {i} is about a cat" for i in range(6)]
    for text in sent:
        "".join(session.reply(text))
        users = [m["content"] for m in session.history if m["role"] == "user"]
        assert users == sent[sent.index(text) - len(users) + 1 : sent.index(text) + 1]
        prompt = tok.render_for_completion(
            [{"role": "system", "content": "Be brief."}, *session.history[:-1]]
        )
        assert len(prompt) <= 64 - 8  # the reply's tokens stay free
    assert session.dropped > 0 and session.dropped % 2 == 0  # whole exchanges
    assert len(session.history) < 2 * len(sent)


@pytest.mark.parametrize(
    ("pieces", "shown"),
    [
        ([], "(empty reply: the model ended its turn at once)"),
        (["\n", " "], "\n "),
        (["Hi", "!"], "Hi!"),
    ],
)
def test_an_empty_reply_is_said_to_be_empty(pieces, shown):
    """A reply that ends at once (or is only whitespace) gets a notice, not a bare blank line."""
    import io
    from types import SimpleNamespace

    from minigpt.chat import _answer

    replying = SimpleNamespace(reply=lambda line: iter(pieces), dropped=0)
    out = io.StringIO()
    _answer(replying, "Hello!", out)
    notice = (
        "(empty reply: the model ended its turn at once)" if not "".join(pieces).strip() else ""
    )
    assert out.getvalue() == "assistant> " + "".join(pieces) + notice + "\n"
    assert shown in out.getvalue()


def test_a_message_too_long_for_the_context_is_refused(session):
    with pytest.raises(ChatError, match="Shorten it"):
        session.reply("word " * 60)
    assert session.history == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    directory = tmp_path_factory.mktemp("ckpt")
    save_model(directory, model, step=0)
    return directory


def spawn_chat(checkpoint):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    args = ["-m", "minigpt", "chat", "--model", str(checkpoint), "--temperature", "0"]
    args += ["--max-new-tokens", "8"]
    return pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=60)


def ask(child, text: str) -> str:
    """Send a line; the streamed reply, as the terminal shows it (newlines as CR LF)."""
    child.sendline(text)
    child.expect_exact("assistant> ")
    child.expect_exact("\r\nyou> ")
    return child.before.replace("\r\n", "\n")


def test_repl_in_a_terminal_answers_resets_and_exits(checkpoint, model):
    session = ChatSession(Engine(model, 50260), get_tokenizer(), GREEDY, reply_tokens=8)
    first = "".join(session.reply("hello"))
    second = "".join(session.reply("hello"))  # with the first exchange in the history
    session.reset()
    session.set_system("Answer in French.")
    with_system = "".join(session.reply("hello"))
    assert len({first, second, with_system}) == 3
    child = spawn_chat(checkpoint)
    child.expect_exact("you> ")
    assert ask(child, "hello") == first
    assert ask(child, "hello") == second
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)\r\nyou> ")
    assert ask(child, "hello") == first  # the history is gone
    child.sendline("/system Answer in French.")
    child.expect_exact("(system prompt set; conversation cleared)\r\nyou> ")
    assert ask(child, "hello") == with_system
    child.sendline("/exit")
    child.expect(pytest.importorskip("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0


def test_repl_exits_on_ctrl_d(checkpoint):
    child = spawn_chat(checkpoint)
    child.expect_exact("you> ")
    child.sendeof()
    child.expect(pytest.importorskip("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0


def make_run(directory, model, source: str):
    """A run directory as `train` (source "") or `sft` leaves it: config.toml, one checkpoint."""
    from minigpt.config import RunConfig, dump_config

    config = RunConfig()
    config.data.source = source
    directory.mkdir()
    (directory / "config.toml").write_text(dump_config(config))
    save_model(directory / "checkpoints" / "step_0000001", model, step=1)
    (directory / "checkpoints" / "latest").write_text("step_0000001\n")
    return directory


def test_chat_on_a_base_model_warns_once_and_a_chat_model_does_not(cli, model, tmp_path):
    base = make_run(tmp_path / "base", model, source="")
    tuned = make_run(tmp_path / "tuned", model, source="conversations.jsonl")
    env = {"OMP_NUM_THREADS": "1"}
    warning = (
        f"minigpt chat: {base} is a base (pre-trained) model, not fine-tuned for chat: "
        "replies will ramble; fine-tune with minigpt sft"
    )
    result = cli("chat", "--model", base, input="", env=env)
    assert result.stderr.count(warning) == 1
    save_model(tmp_path / "bare", model, step=1)  # no run config: nothing says it is a base
    for quiet in (tuned, tuned / "checkpoints" / "step_0000001", tmp_path / "bare"):
        result = cli("chat", "--model", quiet, input="", env=env)
        assert "not fine-tuned for chat" not in result.stderr
