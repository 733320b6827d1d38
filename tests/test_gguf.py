"""GGUF export, checked by running the files in llama.cpp itself (through llama-cpp-python)."""

from __future__ import annotations

import json
import lzma
from importlib import resources

import numpy as np
import pytest
import torch

from minigpt.checkpoints import save_model
from minigpt.config import RunConfig, dump_config
from minigpt.engine import Engine, Sampling
from minigpt.model import GPT
from minigpt.tokenizer import get_tokenizer

from conftest import TOKENIZER_CASES, run_minigpt, tiny_config

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from minigpt.interop.gguf import GGUFError, export_gguf, llama_cpp_plain_buffers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

N_VOCAB = 50260  # what minigpt samples from: GPT-2 plus the chat tokens
CONFIG = dict(n_layer=2, n_head=2, n_embd=64, block_size=128)
CONVERSATIONS = [
    [("What is the capital of France?", "Paris is the capital of France.")],
    [("Name a colour.", "Blue, like the sky at noon.")],
    [("How many legs does a spider have?", "A spider has eight legs.")],
    [("Say hello.", "Hello! How can I help you today?")],
    [("What do cows drink?", "Cows drink water, not milk.")],
    [("Hi!", "Hi there."), ("What is two plus two?", "Two plus two is four.")],
]


def shakespeare_ids(n: int) -> list[int]:
    with lzma.open(resources.files("minigpt.assets").joinpath("shakespeare.jsonl.xz")) as f:
        text = json.loads(f.readline())["text"]
    return get_tokenizer().encode(text[: n * 8])[:n]


def messages_of(turns: list[tuple[str, str]]) -> list[dict]:
    out = []
    for user, assistant in turns:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return out


def train(model: GPT, rows: list[list[int]], steps: int, lr: float) -> GPT:
    """Steps until the rows are memorised, so that greedy choices have clear margins (near-ties of
    a random model could flip between two correct implementations)."""
    width = max(map(len, rows))
    ids = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows])
    targets = torch.tensor([r[1:] + [-100] * (width - len(r) + 1) for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        _, loss = model(ids, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def load_llama(path, **kwargs):
    with llama_cpp_plain_buffers():
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=CONFIG["block_size"],
            n_batch=CONFIG["block_size"],
            n_threads=1,  # tiny models: threads only wait on each other (and on a busy CI machine)
            seed=0,
            verbose=False,
            **kwargs,
        )


def minigpt_greedy(model: GPT, prompt: list[int], n: int, stop_ids=()) -> list[int]:
    engine = Engine(model, N_VOCAB)
    return engine.generate([prompt], n, Sampling(temperature=0), stop_ids=stop_ids)[0]


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """llama.cpp's greedy sampler, stopping after n tokens or at an end-of-generation token."""
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0):
        out.append(token)
        if len(out) == n or llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
    return out


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def minigpt_logits(model: GPT, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].numpy()


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def text():
    return shakespeare_ids(3 * CONFIG["block_size"] + 1)


@pytest.fixture(scope="module")
def base_model(text):
    torch.manual_seed(0)
    return train(GPT(tiny_config(**CONFIG)), [text[:65]], steps=40, lr=1e-2)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A run directory as `minigpt sft` leaves it: config.toml with data.source, a checkpoint."""
    torch.manual_seed(0)
    tokenizer = get_tokenizer()
    rows = [tokenizer.render_conversation(messages_of(c), 128).ids for c in CONVERSATIONS]
    model = train(GPT(tiny_config(**CONFIG)), rows, steps=50, lr=3e-3)
    run = tmp_path_factory.mktemp("sft-run")
    config = RunConfig()
    config.data.source = "conversations.jsonl"
    (run / "config.toml").write_text(dump_config(config))
    save_model(run / "checkpoints" / "step_0000060", model, step=60)
    (run / "checkpoints" / "latest").write_text("step_0000060\n")
    return run, model


@pytest.fixture(scope="module")
def base_files(base_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(base_model, out / f"base-{t}.gguf", t) for t in ("f32", "f16", "q8_0")}


@pytest.fixture(scope="module")
def base_llama(base_files):
    return {t: load_llama(path, logits_all=True) for t, path in base_files.items()}


@pytest.fixture(scope="module")
def chat_llama(chat_run):
    run, _ = chat_run
    path = run / "chat.gguf"
    result = run_minigpt("export", "gguf", run, path)  # the CLI, detecting a chat run
    assert "chat model" in result.stdout
    return load_llama(path)


# ------------------------------------------------------------------------------------------ tokens
def test_tokenizer_cases_match_ours(base_llama):
    llm = base_llama["f32"]
    texts = (TOKENIZER_CASES / "cases.inp").read_text(encoding="utf-8")
    texts = texts.split("\n__ggml_vocab_test__\n")[:-1]
    expected = (TOKENIZER_CASES / "cases.out").read_text(encoding="utf-8").split("\n")
    assert len(texts) == 46
    for text, line in zip(texts, expected, strict=False):
        ids = [int(i) for i in line.split()]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, repr(text)
        assert llm.detokenize(ids).decode() == text


def test_chat_tokens_are_specials_only_when_parsed(base_llama):
    llm, tokenizer = base_llama["f32"], get_tokenizer()
    text = "<|USER|>Hi, <|END|> is a token<|END|><|ASSISTANT|>"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == [
        tokenizer.user_id,
        *tokenizer.encode("Hi, "),
        tokenizer.end_id,
        *tokenizer.encode(" is a token"),
        tokenizer.end_id,
        tokenizer.assistant_id,
    ]
    # user text: special-token strings stay characters, as minigpt's encode keeps them
    for typed in (text, "a <|endoftext|> b <|USER|>"):
        assert llm.tokenize(typed.encode(), add_bos=False, special=False) == tokenizer.encode(typed)
    assert llm.token_bos() == llm.token_eos() == tokenizer.eot_id
    assert llm.n_vocab() == 50304


# ---------------------------------------------------------------------------------- f32: exactness
# ggml evaluates GELU through a float16 lookup table and keeps the KV cache in float16, so f32
# files agree to about 1e-4 of the logits' scale (measured: 2.5e-3 on logits up to 15), not 1e-6
LOGIT_TOLERANCE = 5e-3


def test_f32_logits_match_minigpt(base_model, base_llama, text):
    ids = text[: CONFIG["block_size"]]
    diff = np.abs(llama_logits(base_llama["f32"], ids) - minigpt_logits(base_model, ids))
    assert diff.max() <= LOGIT_TOLERANCE


def test_f32_greedy_64_tokens_identical(base_model, base_llama, text):
    for start in (0, 100):
        prompt = text[start : start + 16]
        expected = minigpt_greedy(base_model, prompt, 64, stop_ids={get_tokenizer().eot_id})
        assert llama_greedy(base_llama["f32"], prompt, 64) == expected


def test_chat_model_through_template_stops_at_end(chat_run, chat_llama):
    _, model = chat_run
    tokenizer = get_tokenizer()
    assert chat_llama.metadata["tokenizer.ggml.eot_token_id"] == str(tokenizer.end_id)
    stops = {tokenizer.end_id, tokenizer.eot_id}
    ended = 0
    for conversation in CONVERSATIONS:
        messages = messages_of(conversation)[:-1]
        prompt = tokenizer.render_for_completion(messages)
        expected = minigpt_greedy(model, prompt, 64, stop_ids=stops)
        reply = chat_llama.create_chat_completion(messages, temperature=0.0, max_tokens=64)
        choice = reply["choices"][0]
        assert choice["message"]["content"] == tokenizer.decode(
            [t for t in expected if t not in stops]
        )
        assert (choice["finish_reason"] == "stop") == (expected[-1] == tokenizer.end_id)
        ended += expected[-1] == tokenizer.end_id
    assert ended >= len(CONVERSATIONS) - 1  # the trained model does end its turns


def test_chat_template_renders_our_prompt(chat_llama):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tokenizer = get_tokenizer()
    formatter = Jinja2ChatFormatter(
        chat_llama.metadata["tokenizer.chat_template"], eos_token="", bos_token=""
    )
    messages = [{"role": "system", "content": "Be brief."}, *messages_of(CONVERSATIONS[-1])[:-1]]
    prompt = formatter(messages=messages).prompt
    ids = chat_llama.tokenize(prompt.encode(), add_bos=False, special=True)
    assert ids == tokenizer.render_for_completion(messages)


# ---------------------------------------------------------------------------- f16 / q8_0: closeness
@pytest.mark.parametrize("file_type, min_agreement", [("f16", 0.99), ("q8_0", 0.95)])
def test_smaller_types_agree_with_minigpt(base_model, base_llama, text, file_type, min_agreement):
    llm, block = base_llama[file_type], CONFIG["block_size"]
    for start in (0, 100):
        prompt = text[start : start + 16]
        expected = minigpt_greedy(base_model, prompt, 32)
        assert llama_greedy(llm, prompt, 32) == expected
    same = total = 0
    for start in range(0, 3 * block, block):
        ids = text[start : start + block]
        ours = minigpt_logits(base_model, ids)[:, :N_VOCAB].argmax(-1)
        theirs = llama_logits(llm, ids)[:, :N_VOCAB].argmax(-1)
        same, total = same + int((ours == theirs).sum()), total + len(ids)
    assert total == 384 and same / total >= min_agreement


def test_file_sizes_shrink_with_the_type(base_files):
    sizes = {t: path.stat().st_size for t, path in base_files.items()}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


# ------------------------------------------------------------------------------------- bad input
def test_existing_file_needs_overwrite(chat_run, tmp_path):
    run, _ = chat_run
    out = tmp_path / "model.gguf"
    out.write_text("keep me")
    result = run_minigpt("export", "gguf", run, out, check=False)
    assert result.returncode == 2 and "exists; pass --overwrite" in result.stderr
    assert out.read_text() == "keep me"


def test_context_longer_than_position_table(tmp_path):
    model = GPT(tiny_config(**CONFIG))
    model.config.block_size = 256  # a context the 128-row position table cannot serve
    with pytest.raises(GGUFError, match=r"block_size=256.*position table \(128 rows\)"):
        export_gguf(model, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_models_llama_cpp_cannot_hold(tmp_path):
    with pytest.raises(GGUFError, match="n_embd=48 is not a multiple of 32"):
        export_gguf(GPT(tiny_config(n_embd=48)), tmp_path / "m.gguf", "q8_0")
    with pytest.raises(GGUFError, match="vocab_size 50257 cannot hold"):
        export_gguf(GPT(tiny_config(vocab_size=50257)), tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------- metadata, shapes
def test_base_model_has_no_chat_metadata(base_llama):
    metadata = base_llama["f32"].metadata
    assert "tokenizer.chat_template" not in metadata
    assert "tokenizer.ggml.eot_token_id" not in metadata
    assert metadata["gpt2.context_length"] == str(CONFIG["block_size"])
    assert metadata["tokenizer.ggml.add_bos_token"] == "false"


def test_chat_detection_follows_the_run(chat_run, tmp_path):
    from minigpt.checkpoints import chat_tuned

    run, model = chat_run
    assert chat_tuned(run) and chat_tuned(run / "checkpoints" / "step_0000060")
    save_model(tmp_path, model, step=1)  # a bare checkpoint: no run config says "chat"
    assert chat_tuned(tmp_path) is None


def test_model_without_biases_runs_exactly(text, tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config(**CONFIG, bias=False)).eval()
    llm = load_llama(export_gguf(model, tmp_path / "nobias.gguf"), logits_all=True)
    ids = text[:32]
    assert np.abs(llama_logits(llm, ids) - minigpt_logits(model, ids)).max() <= LOGIT_TOLERANCE
