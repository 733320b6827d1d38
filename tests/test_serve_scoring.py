"""Scoring through the server: logprobs (chat and the legacy completions shape, with echo)
against the model's own log-softmax, token-id prompts, vLLM's tokenizer endpoints, and
lm-evaluation-harness's `local-completions` model giving `minigpt eval`'s scores."""

from __future__ import annotations

import json

import httpx
import jinja2
import pytest
import torch

from minigpt.engine import Engine, Sampling
from minigpt.model import GPT, GPT2_VOCAB_SIZE
from minigpt.serve.logprobs import token_name
from minigpt.tokenizer import get_tokenizer
from tests.conftest import tiny_config
from tests.test_serve import MODEL, LiveServer, chat_prompt, chat_stops

N_VOCAB = GPT2_VOCAB_SIZE  # a base model's vocabulary, as `minigpt eval` normalises over it


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return Engine(GPT(tiny_config(block_size=256)).eval(), N_VOCAB)


@pytest.fixture(scope="module")
def server(engine):
    torch.set_num_threads(1)
    live = LiveServer(engine, max_batch=8, max_queue=16)
    yield live
    live.close()


def post(server, path: str, body: dict) -> dict:
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@torch.no_grad()
def log_softmax(engine: Engine, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) log-probabilities of the token after each position, over the engine's ids."""
    logits, _ = engine.model(torch.tensor([ids]))
    return logits[0, :, :N_VOCAB].float().log_softmax(dim=-1)


def test_echo_logprobs_score_the_prompt_as_the_models_log_softmax(server, engine):
    tok = get_tokenizer()
    prompt = tok.encode("The quick brown fox jumps over the lazy dog")
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 2, "echo": True}
    choice = post(server, "/v1/completions", body)["choices"][0]
    generated = Engine(engine.model, N_VOCAB).generate([prompt], 3, Sampling(temperature=0))[0]
    logp = log_softmax(engine, prompt + generated)
    ids = prompt + generated
    columns = choice["logprobs"]
    assert columns["tokens"] == [token_name(tok, t) for t in ids]
    assert columns["token_logprobs"][0] is None and columns["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        assert columns["token_logprobs"][i] == pytest.approx(logp[i - 1, ids[i]].item(), abs=1e-4)
        top = logp[i - 1].topk(2)
        pairs = zip(top.indices.tolist(), top.values.tolist(), strict=True)
        want = {token_name(tok, t): v for t, v in pairs}
        got = columns["top_logprobs"][i]
        assert set(want) <= set(got) and len(got) <= 3  # the two best and the token itself
        for name, value in want.items():
            assert got[name] == pytest.approx(value, abs=1e-4)
    text = tok.decode(ids)
    assert choice["text"] == text
    offsets = [len(tok.decode(prompt[:i])) for i in range(len(prompt))]
    assert columns["text_offset"][: len(prompt)] == offsets
    # without echo: only the generated tokens, offsets into the completion's own text
    plain = post(server, "/v1/completions", {**body, "echo": False})["choices"][0]
    assert plain["logprobs"]["tokens"] == columns["tokens"][len(prompt) :]
    assert plain["logprobs"]["token_logprobs"] == columns["token_logprobs"][len(prompt) :]
    assert plain["logprobs"]["text_offset"][0] == 0


def test_greedy_tokens_are_their_top_logprob_exactly(server):
    """lm-eval calls a continuation greedy when each token's logprob equals the max of its
    top_logprobs: the two must come from one computation, bit for bit."""
    body = {"prompt": "Hello there, my friend", "max_tokens": 5, "temperature": 0, "logprobs": 1}
    columns = post(server, "/v1/completions", body)["choices"][0]["logprobs"]
    for value, top in zip(columns["token_logprobs"], columns["top_logprobs"], strict=True):
        assert value == max(top.values())


def test_chat_logprobs_and_top_logprobs(engine):
    tok = get_tokenizer()
    engine = Engine(engine.model, tok.n_vocab)  # the chat tokens too
    server = LiveServer(engine, max_batch=4)
    body = {
        "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    reply = post(server, "/v1/chat/completions", body)["choices"][0]
    prompt = chat_prompt("Hi there")
    generated = engine.generate([prompt], 6, Sampling(temperature=0), stop_ids=chat_stops())[0]
    content = [t for t in generated if t not in chat_stops()]
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt + generated]))[0][0, :, : tok.n_vocab]
    logp = logits.float().log_softmax(dim=-1)
    entries = reply["logprobs"]["content"]
    assert [e["token"] for e in entries] == [token_name(tok, t) for t in content]
    for k, (entry, token) in enumerate(zip(entries, content, strict=True)):
        row = logp[len(prompt) - 1 + k]
        assert entry["logprob"] == pytest.approx(row[token].item(), abs=1e-4)
        assert entry["bytes"] == list(tok.decode_bytes([token]))
        assert [t["token"] for t in entry["top_logprobs"]] == [
            token_name(tok, t) for t in row.topk(3).indices.tolist()
        ]
    assert (
        b"".join(bytes(e["bytes"]) for e in entries).decode(errors="replace")
        == (reply["message"]["content"])
    )
    # streamed: the same entries, spread over the chunks
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line[6:].startswith("{")]
    server.close()
    streamed = [e for c in chunks for e in (c["choices"][0]["logprobs"] or {}).get("content", [])]
    assert streamed == entries


def test_token_id_prompts_and_lists_of_prompts(server):
    tok = get_tokenizer()
    texts = ["Once upon a time", "In a galaxy far", "The"]
    body = {"max_tokens": 5, "temperature": 0}
    alone = [
        post(server, "/v1/completions", {**body, "prompt": t})["choices"][0]["text"] for t in texts
    ]
    as_ids = post(server, "/v1/completions", {**body, "prompt": [tok.encode(t) for t in texts]})
    as_texts = post(server, "/v1/completions", {**body, "prompt": texts, "n": 2})
    one = post(server, "/v1/completions", {**body, "prompt": tok.encode(texts[0])})
    assert [c["text"] for c in as_ids["choices"]] == alone
    assert [c["index"] for c in as_texts["choices"]] == list(range(6))
    assert [c["text"] for c in as_texts["choices"]] == [t for t in alone for _ in range(2)]
    assert one["choices"][0]["text"] == alone[0]
    assert as_ids["usage"]["prompt_tokens"] == sum(len(tok.encode(t)) for t in texts)
    for bad, words in (([], "empty list"), ([[1], []], "must not be empty"),
                       ([5, N_VOCAB], f"0..{N_VOCAB - 1}"), (["a"] * 65, "65 prompts")):  # fmt: skip
        r = httpx.post(server.url + "/v1/completions", json={"prompt": bad}, timeout=30)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_tokenizer_endpoints_in_vllms_shapes(server):
    tok = get_tokenizer()
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 256
    out = post(server, "/tokenize", {"prompt": "Hello world", "add_special_tokens": False})
    assert out == {"count": 2, "max_model_len": 256, "tokens": tok.encode("Hello world"),
                   "token_strs": None}  # fmt: skip
    assert post(server, "/tokenize", {"prompt": "<|endoftext|>"})["tokens"] == [tok.eot_id]
    named = post(server, "/tokenize", {"prompt": "a b", "return_token_strs": True})
    assert named["token_strs"] == ["a", " b"]
    assert post(server, "/detokenize", {"tokens": tok.encode("naïve café")}) == {
        "prompt": "naïve café"
    }
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]  # fmt: skip
    chat = post(server, "/tokenize", {"messages": messages})["tokens"]
    assert chat == tok.render_for_completion(messages)
    rendered = jinja2.Environment().from_string(info["chat_template"])
    for conversation in (messages, messages[1:], messages[:1]):
        text = rendered.render(messages=conversation, add_generation_prompt=False)
        want = tok.render_conversation(conversation, max_tokens=10_000).ids
        assert tok.encode_with_special_tokens(text) == want
    r = httpx.post(server.url + "/detokenize", json={"tokens": [tok.n_vocab]}, timeout=30)
    assert r.status_code == 400
    r = httpx.post(server.url + "/tokenize", json={}, timeout=30)
    assert r.status_code == 400 and "either prompt or messages" in r.json()["error"]["message"]


ARC_ROWS = [  # ARC-Easy's schema, made up: a task on local data
    ("Which of these is a mammal?", ["a trout", "a whale", "a sparrow", "a frog"], "B"),
    ("What do plants need to make food?", ["sunlight", "sand", "noise", "plastic"], "A"),
    ("Which is a liquid at room temperature?", ["iron", "ice", "water", "salt"], "C"),
    ("What pulls objects toward Earth?", ["magnetism", "friction", "light", "gravity"], "D"),
    ("Which tool measures temperature?", ["a ruler", "a thermometer", "a scale", "a clock"], "B"),
    ("What gas do people breathe out?", ["oxygen", "helium", "carbon dioxide", "neon"], "C"),
    ("Which season is usually coldest?", ["winter", "summer", "spring", "autumn"], "A"),
    ("What is frozen water called?", ["steam", "ice", "fog", "dew"], "B"),
]


def test_lm_eval_local_completions_through_the_server_scores_as_minigpt_eval(
    server, engine, tmp_path, monkeypatch
):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from minigpt.evals import multiple_choice
    from minigpt.evals.harness import offline_task_config
    from minigpt.evals.tasks import get_task

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    rows = tmp_path / "arc_easy.jsonl"
    rows.write_text("".join(
        json.dumps({"id": f"q{i}", "question": q, "answerKey": key,
                    "choices": {"text": choices, "label": list("ABCD")}}) + "\n"
        for i, (q, choices, key) in enumerate(ARC_ROWS)
    ))  # fmt: skip
    manager = TaskManager()
    result = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={MODEL},base_url={server.url}/v1/completions,max_length=256",
        tasks=[offline_task_config("arc_easy", {"eval": rows}, manager)],
        task_manager=manager,
    )
    assert result["config"]["model_args"]  # it ran through the server, not a local model
    scores = result["results"]["arc_easy"]
    examples = get_task("arc_easy").load(rows).examples
    predictions = multiple_choice.predict(engine.model, examples, "cpu")
    summary = multiple_choice.summarize(multiple_choice.tally(predictions, examples), 1)
    assert (scores["acc,none"], scores["acc_norm,none"]) == pytest.approx(
        (summary["acc"], summary["acc_norm"])
    )
    requests = server.app.state.metrics.requests
    assert requests.labels("/v1/completions", "200")._value.get() >= 4 * len(ARC_ROWS)
    assert requests.labels("/tokenize", "200")._value.get() >= 1  # its remote tokenizer
