"""`minigpt serve` against a live server on 127.0.0.1, driven by the official `openai` client and
raw HTTP: OpenAI shapes, streaming, continuous batching, limits, errors, disconnects."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

from minigpt.engine import Engine, Sampling
from minigpt.model import GPT
from minigpt.serve import Limits, create_app
from minigpt.serve.guard import loopback_hosts, server_config
from minigpt.serve.text import StopMatcher, TextStream
from minigpt.tokenizer import get_tokenizer
from tests.conftest import free_port, tiny_config, wait_until_healthy

MODEL = "tiny"
N_VOCAB = 50260


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    # a long context, so that an unbounded reply takes long enough to be cancelled mid-way
    return Engine(GPT(tiny_config(block_size=1024)).eval(), N_VOCAB)


class LiveServer:
    """uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, engine: Engine, server: dict | None = None, **options) -> None:
        self.port = free_port()
        self.app = create_app(lambda: engine, MODEL, **options)
        config = server_config(
            self.app, "127.0.0.1", self.port, log_level="warning", **(server or {})
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started or not self.app.state.scheduler.ready.is_set():
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kwargs)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(engine):
    torch.set_num_threads(1)
    live = LiveServer(engine, max_batch=16, max_queue=32)
    yield live
    live.close()


def alone(engine: Engine, prompt: list[int], max_tokens: int, stops: set[int]) -> list[int]:
    out = engine.generate([prompt], max_tokens, Sampling(temperature=0), stop_ids=stops)[0]
    return [t for t in out if t not in stops]


def chat_prompt(text: str) -> list[int]:
    return get_tokenizer().render_for_completion([{"role": "user", "content": text}])


def chat_stops() -> set[int]:
    tok = get_tokenizer()
    return {tok.eot_id, tok.user_id, tok.assistant_id, tok.end_id}


def test_chat_and_completions_with_the_openai_client_match_the_engine(server, engine):
    tok = get_tokenizer()
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=12,
        temperature=0,
    )
    expected = alone(engine, chat_prompt("Hello there"), 12, chat_stops())
    assert reply.choices[0].message.content == tok.decode(expected)
    assert reply.choices[0].message.role == "assistant"
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.usage.prompt_tokens == len(chat_prompt("Hello there"))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    text = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=9, temperature=0)
    want = alone(engine, tok.encode("Once upon"), 9, {tok.eot_id})
    assert text.choices[0].text == tok.decode(want)
    assert text.choices[0].finish_reason == ("length" if len(want) == 9 else "stop")
    assert text.usage.completion_tokens == 9 or text.choices[0].finish_reason == "stop"


def test_streaming_gives_the_same_text_in_chunks_with_usage(server):
    client = server.client()
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=20)
    whole = client.chat.completions.create(**kwargs, temperature=0)
    chunks = list(
        client.chat.completions.create(
            **kwargs, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    stream = client.completions.create(model=MODEL, prompt="a", max_tokens=5, stream=True, seed=1)
    assert len([c for c in stream]) >= 1


def test_n_seed_and_stop_strings(server, engine):
    client = server.client()
    kwargs = dict(model=MODEL, prompt="The", max_tokens=15, temperature=1.0)
    first = client.completions.create(**kwargs, n=3, seed=5, extra_body={"top_k": 100})
    again = client.completions.create(**kwargs, n=3, seed=5, extra_body={"top_k": 100})
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len({c.text for c in first.choices}) > 1  # three different samples
    other = client.completions.create(**kwargs, n=3, seed=6, extra_body={"top_k": 100})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]

    greedy = client.completions.create(model=MODEL, prompt="The", max_tokens=30, temperature=0)
    full = greedy.choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    for stream in (False, True):
        out = client.completions.create(
            model=MODEL, prompt="The", max_tokens=30, temperature=0, stop=[stop], stream=stream
        )
        if stream:
            chunks = list(out)
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = out.choices[0].text, out.choices[0].finish_reason
        assert (text, reason) == (cut, "stop")


def test_text_stream_holds_back_partial_characters_and_stop_strings():
    tok = get_tokenizer()
    text = "naïve 🦙漢字 café, then STOP here"
    ids = tok.encode(text)
    assert any(not _valid_utf8(tok.decode_bytes([t])) for t in ids)  # some token splits a char
    stream = TextStream(tok, ["STOP", "never-seen"])
    pieces = [stream.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.finish() == "naïve 🦙漢字 café, then "
    assert stream.stopped
    # a possible stop string's start waits; once it is clearly not one, it is sent
    stream = TextStream(tok, ["ABCD"])
    sent = [stream.push(t) for t in tok.encode("xx ABC")]
    assert "".join(sent) == "xx " and stream.push(tok.encode("E")[0]) == "ABCE"


def test_text_stream_work_per_token_is_bounded_by_its_new_characters(monkeypatch):
    tok = get_tokenizer()
    ids = tok.encode(" the quick brown fox jumps over the lazy dog" * 200)[:1024]
    stops = [" the quick brown fox" * 12 + c for c in "WXYZ"]  # 4 x 241 chars, never complete
    assert all(len(s) <= 256 for s in stops)

    def run(stop: list[str]) -> tuple[str, float]:
        start = time.perf_counter()
        stream = TextStream(tok, stop)
        text = "".join(stream.push(t) for t in ids) + stream.finish()
        return text, time.perf_counter() - start

    (plain, bare), (held, with_stops) = run([]), run(stops)
    assert held == plain == tok.decode(ids)  # the long near-misses are all sent in the end
    bare, with_stops = min(bare, run([])[1]), min(with_stops, run(stops)[1])
    assert with_stops < 20 * bare + 0.02, (with_stops, bare)
    # each new character is examined once per stop string, however long the text has grown
    fed = []
    feed = StopMatcher.feed
    monkeypatch.setattr(StopMatcher, "feed", lambda self, c: fed.append(c) or feed(self, c))
    stream = TextStream(tok, stops)
    for t in ids:
        stream.push(t)
    assert len(fed) == 4 * len(tok.decode(ids))


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_sixteen_concurrent_greedy_streams_each_get_their_text_alone(server, engine):
    tok = get_tokenizer()
    prompts = [("word " * (1 + 2 * i)).strip() for i in range(16)]
    lengths = [4 + 3 * i for i in range(16)]

    def stream(i: int) -> str:
        chunks = server.client().completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=lengths[i], temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in chunks)

    batch_sizes = []
    metrics = server.app.state.metrics
    watcher = threading.Thread(
        target=lambda: [
            (batch_sizes.append(metrics.batch_size._value.get()), time.sleep(0.005))
            for _ in range(400)
        ],
        daemon=True,
    )
    watcher.start()
    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(stream, range(16)))
    for i, text in enumerate(texts):
        assert text == tok.decode(alone(engine, tok.encode(prompts[i]), lengths[i], {tok.eot_id}))
    watcher.join()
    assert max(batch_sizes) > 1  # they really shared the batch


def test_prompts_prefilled_in_small_chunks_stream_their_text_alone(engine):
    tok = get_tokenizer()
    live = LiveServer(engine, max_batch=6, max_prefill_tokens=4)
    prompts = [("token " * (1 + 5 * i)).strip() for i in range(6)]

    def stream(i: int) -> str:
        chunks = live.client().completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=8, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in chunks)

    try:
        with ThreadPoolExecutor(6) as pool:
            texts = list(pool.map(stream, range(6)))
    finally:
        live.close()
    for prompt, text in zip(prompts, texts, strict=True):
        assert text == tok.decode(alone(engine, tok.encode(prompt), 8, {tok.eot_id}))


def _post(server, path, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=30, **kwargs)


def test_a_poisoned_row_fails_its_request_alone_and_a_tiny_temperature_is_greedy(engine):
    tok = get_tokenizer()
    live = LiveServer(engine, max_batch=8)
    batch = live.app.state.scheduler.batch
    poisoned = tok.encode("poison pill")
    head = batch.decoder.head

    def poison(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden).clone()
        for r, seq in enumerate(batch.rows):
            if list(seq.prompt) == poisoned and len(seq.tokens) >= 3 and len(batch.rows) > 1:
                logits[r, 100] = float("nan")
        return logits

    batch.decoder.head = poison
    prompts = ["one two", "three four five", "six"]

    def healthy(i: int) -> str:
        chunks = live.client().completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=40, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in chunks)

    try:
        with ThreadPoolExecutor(5) as pool:
            texts = [pool.submit(healthy, i) for i in range(3)]
            bad = pool.submit(
                _post, live, "/v1/completions", {"prompt": "poison pill", "max_tokens": 200}
            )
            tiny = pool.submit(
                _post,
                live,
                "/v1/completions",
                {"prompt": "one two", "max_tokens": 40, "temperature": 1e-45},
            )
            bad, tiny = bad.result(), tiny.result()
            texts = [t.result() for t in texts]
        assert bad.status_code == 500, bad.text
        assert bad.json()["error"]["type"] == "server_error"
        assert "not finite" in bad.json()["error"]["message"]
        for prompt, text in zip(prompts, texts, strict=True):
            assert text == tok.decode(alone(engine, tok.encode(prompt), 40, {tok.eot_id}))
        assert tiny.status_code == 200, tiny.text
        assert tiny.json()["choices"][0]["text"] == texts[0]  # greedy
    finally:
        live.close()


def test_text_that_fails_to_render_fails_only_its_own_request(server, engine, monkeypatch):
    tok = get_tokenizer()
    push = TextStream.push

    def fragile(self, token: int) -> str:
        if any(m.stop == "boom" for m in self.matchers):
            raise UnicodeError("broken")
        return push(self, token)

    monkeypatch.setattr(TextStream, "push", fragile)
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(
            _post, server, "/v1/completions", {"prompt": "a", "max_tokens": 30, "stop": "boom"}
        )
        good = pool.submit(
            _post, server, "/v1/completions", {"prompt": "b c", "max_tokens": 30, "temperature": 0}
        )
        bad, good = bad.result(), good.result()
    assert bad.status_code == 500 and "UnicodeError" in bad.json()["error"]["message"]
    want = tok.decode(alone(engine, tok.encode("b c"), 30, {tok.eot_id}))
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == want


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 400, "not valid JSON"),
        ([1, 2], 400, "valid dictionary"),
        ({"messages": "hi"}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            400,
            "temperature",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 17}, 400, "--max-batch"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, 400, "stop"),
        (
            {"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b" * 257]},
            400,
            "stop: a stop string has 257 characters; the limit is 256",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            400,
            "needs logprobs",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21}, 400, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 5}},
            400,
            "logit_bias",
        ),
        ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "end with a user message"),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000},
            400,
            "max_tokens asks for 5000 more",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, 404, "gpt-4"),
        ({"messages": [{"role": "user", "content": "x" * 8001}]}, 400, "8001 characters"),
        ({"messages": [{"role": "user", "content": "x"}] * 501}, 400, "501 messages"),
        ({"messages": [{"role": "user", "content": "ab" * 3000}] * 6}, 400, "36000 characters"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, words):
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"]


def test_context_overflow_names_both_counts_and_unknown_routes_are_json(server):
    tok = get_tokenizer()
    r = _post(server, "/v1/completions", {"prompt": "hello" * 1100})
    n = len(tok.encode("hello" * 1100))
    assert r.status_code == 400 and f"the prompt has {n} tokens" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", {"prompt": "hello" * 100, "max_tokens": 1000})
    n, message = len(tok.encode("hello" * 100)), r.json()["error"]["message"]
    assert r.status_code == 400 and f"has {n} tokens" in message and "1000 more" in message
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(server.url + "/v1/models/other").status_code == 404


def test_health_metrics_and_page(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    metrics = httpx.get(server.url + "/metrics").text
    for name in (
        "minigpt_requests_total",
        "minigpt_generated_tokens_total",
        "minigpt_queue_depth",
        "minigpt_batch_size",
        "minigpt_time_to_first_token_seconds_bucket",
    ):
        assert name in metrics
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from outside


def test_disconnect_frees_the_row_and_a_full_queue_answers_503(engine):
    # each step takes at least 5 ms, so the first request cannot finish its 1000 tokens before
    # the test has disconnected it, however loaded the machine
    slow = engine.model.transformer.wte.register_forward_pre_hook(lambda *_: time.sleep(0.005))
    live = LiveServer(engine, max_batch=1, max_queue=1)
    try:
        metrics = live.app.state.metrics
        body = {"prompt": "start", "max_tokens": 1000, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as first:
            with first.stream("POST", live.url + "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")  # the one row is now busy
                waiting = ThreadPoolExecutor(1).submit(
                    _post, live, "/v1/completions", {"prompt": "next", "max_tokens": 3}
                )
                deadline = time.monotonic() + 10
                while metrics.queue_depth._value.get() < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                full = _post(live, "/v1/completions", {"prompt": "third", "max_tokens": 3})
                assert full.status_code == 503 and full.headers["retry-after"] == "1"
                assert full.json()["error"]["code"] == "queue_full"
        # the first client has gone: its generation stops and the waiting request is served
        answer = waiting.result(timeout=30)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
        assert metrics.cancelled._value.get() == 1
        assert metrics.generated_tokens._value.get() < 1000
    finally:
        slow.remove()
        live.close()


def test_api_key_and_cors(engine):
    live = LiveServer(engine, api_keys=("s3cret",), cors_origins=("http://example.test",))
    try:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        assert _post(live, "/v1/chat/completions", body).status_code == 401
        wrong = _post(live, "/v1/chat/completions", body, headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            live.client().models.list()
        ok = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model=MODEL, **body).usage.completion_tokens >= 1
        assert httpx.get(live.url + "/health").status_code == 200  # no key needed to probe
        preflight = httpx.options(
            live.url + "/v1/chat/completions",
            headers={"Origin": "http://example.test", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == "http://example.test"
    finally:
        live.close()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_non_ascii_key_is_401_and_deep_json_is_400_with_no_traceback(engine, capfd):
    records = _Records()
    loggers = [logging.getLogger(name) for name in ("minigpt", "uvicorn")]
    for logger in loggers:
        logger.addHandler(records)
    live = LiveServer(engine, api_keys=("s3cret",))
    try:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        for header in ("Bearer é".encode(), "Bearer \u00e9".encode("latin-1"), b"Bearer s3cr\xc3"):
            r = _post(live, "/v1/chat/completions", body, headers={"Authorization": header})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        key = {"Authorization": "Bearer s3cret"}
        for deep in (b"[" * 150_000, b'{"messages": ' + b"[" * 150_000):
            r = _post(live, "/v1/chat/completions", deep, headers=key)
            assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
        r = _post(live, "/v1/chat/completions", body, headers=key)
        assert r.status_code == 200  # and the server still serves
    finally:
        live.close()
        for logger in loggers:
            logger.removeHandler(records)
    assert not [r for r in records.records if r.exc_info], records.records
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("key", ["clé", "two words", ""])
def test_a_key_no_header_can_carry_is_refused_at_startup_in_one_line(key, monkeypatch, capsys):
    from minigpt.cli import common, main

    monkeypatch.setattr(common, "check_model_args", lambda args: None)  # no model needed
    monkeypatch.setattr(common, "warn_if_base_model", lambda verb, model: None)
    assert main(["serve", "--model", "unused", "--port", "0", "--api-key", key]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "minigpt serve: error: --api-key must be visible ASCII characters (no spaces, no "
        "accents): clients send it in the 'Authorization: Bearer KEY' header, which carries "
        "nothing else"
    ]


def test_health_is_503_until_the_model_is_loaded(engine):
    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return engine

    app = create_app(slow_load, MODEL, limits=Limits())
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        assert client.get("/health").status_code == 503
        r = client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        gate.set()
        app.state.scheduler.ready.wait(30)
        assert client.get("/health").status_code == 200


def test_load_of_eight_clients_for_three_seconds_loses_and_mixes_nothing(server, engine):
    tok = get_tokenizer()
    prompts = [f"client {i} says" for i in range(8)]
    expected = {
        p: tok.decode(alone(engine, tok.encode(p), 6 + i, {tok.eot_id}))
        for i, p in enumerate(prompts)
    }

    def client(i: int) -> int:
        api, done = server.client(), 0
        end = time.monotonic() + 3
        while time.monotonic() < end:
            stream = done % 2 == 0
            out = api.completions.create(
                model=MODEL, prompt=prompts[i], max_tokens=6 + i, temperature=0, stream=stream
            )
            text = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
            assert text == expected[prompts[i]], (i, done)
            done += 1
        return done

    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(client, range(8)))
    assert min(counts) >= 1


def test_cli_reports_a_model_that_cannot_load_in_one_line(cli):
    result = cli("serve", "--model", "/nonexistent/run", "--port", "0", check=False, timeout=120)
    assert result.returncode == 2
    assert "minigpt serve: error: /nonexistent/run" in result.stderr


def test_a_base_model_is_said_to_be_no_chat_model_in_the_models_and_on_the_page(engine):
    from fastapi.testclient import TestClient

    with TestClient(create_app(lambda: engine, MODEL, chat_model=False)) as client:
        assert client.get("/v1/models").json()["data"][0]["chat_model"] is False
        assert client.get(f"/v1/models/{MODEL}").json()["chat_model"] is False
        page = client.get("/").text
        assert 'id="base-model"' in page and "not fine-tuned for" in page
        assert '$("base-model").hidden = b.data[0].chat_model !== false' in page
    with TestClient(create_app(lambda: engine, MODEL, chat_model=True)) as client:
        assert client.get("/v1/models").json()["data"][0]["chat_model"] is True


def _closed_within(sockets: list[socket.socket], seconds: float) -> float:
    """Seconds until the server has closed every socket (it may answer first, e.g. a 408)."""
    start, open_ = time.monotonic(), list(sockets)
    while open_:
        assert time.monotonic() - start < seconds, f"{len(open_)} connections still open"
        for s in list(open_):
            try:
                while s.recv(4096):
                    pass
                open_.remove(s)  # b"": the server closed it
            except BlockingIOError:
                pass
            except ConnectionResetError:
                open_.remove(s)
        time.sleep(0.02)
    return time.monotonic() - start


def test_slow_loris_clients_are_cut_off_after_the_read_timeout(engine):
    live = LiveServer(engine, server={"read_timeout": 1.0}, body_timeout=1.0)
    try:
        host = f"Host: 127.0.0.1:{live.port}\r\n".encode()
        partial_headers = b"POST /v1/completions HTTP/1.1\r\n" + host + b"Content-Type: applic"
        partial_body = (
            b"POST /v1/completions HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"prompt": '
        )
        sockets = []
        for i in range(40):
            s = socket.create_connection(("127.0.0.1", live.port))
            s.sendall(partial_headers if i % 2 else partial_body)
            s.setblocking(False)
            sockets.append(s)
        # an idle connection after a response is cut as well
        kept = socket.create_connection(("127.0.0.1", live.port))
        kept.sendall(b"GET /health HTTP/1.1\r\n" + host + b"\r\n")
        assert b"200 OK" in kept.recv(4096)
        kept.sendall(b"GET /hea")
        kept.setblocking(False)
        assert _closed_within([*sockets, kept], 6) < 6
        assert httpx.get(live.url + "/health").status_code == 200  # the server is still fine
        # the body's timeout answers 408 before closing
        s = socket.create_connection(("127.0.0.1", live.port), timeout=10)
        s.sendall(partial_body)
        assert b"408" in s.recv(4096).split(b"\r\n")[0]
        s.close()
        for s in sockets:
            s.close()
    finally:
        live.close()


def test_a_request_past_the_request_timeout_is_cancelled_and_frees_its_row(engine):
    slow = engine.model.transformer.wte.register_forward_pre_hook(lambda *_: time.sleep(0.005))
    live = LiveServer(engine, max_batch=1, max_queue=2, request_timeout=1.0)
    try:
        body = {"prompt": "start", "max_tokens": 1000, "temperature": 0}
        start = time.monotonic()
        r = _post(live, "/v1/completions", body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        assert "--request-timeout of 1 s" in r.json()["error"]["message"]
        assert time.monotonic() - start < 5
        with httpx.stream(
            "POST", live.url + "/v1/completions", json={**body, "stream": True}, timeout=30
        ) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-1][6:])["error"]["code"] == "request_timeout"
        # the one row is free again: a short request is served at once
        again = _post(live, "/v1/completions", {"prompt": "next", "max_tokens": 3})
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 3
        metrics = live.app.state.metrics
        assert metrics.cancelled._value.get() == 2
        assert metrics.generated_tokens._value.get() < 1000
    finally:
        slow.remove()
        live.close()


def test_hosts_json_only_posts_and_security_headers(engine):
    live = LiveServer(engine, allowed_hosts=loopback_hosts(0) + ("chat.example.test:8443",))
    try:
        assert httpx.get(live.url + "/health").status_code == 200
        for host in (f"localhost:{live.port}", f"[::1]:{live.port}", "chat.example.test:8443"):
            assert httpx.get(live.url + "/health", headers={"Host": host}).status_code == 200
        for host in ("evil.test", f"evil.test:{live.port}", "chat.example.test:80"):
            r = httpx.get(live.url + "/v1/models", headers={"Host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed"
            assert r.headers["x-content-type-options"] == "nosniff"
        url, body = live.url + "/v1/completions", b'{"prompt": "x", "max_tokens": 1}'
        for kind in (None, "text/plain", "application/x-www-form-urlencoded"):
            r = httpx.post(url, content=body, headers={"Content-Type": kind} if kind else {})
            assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
        typed = {"Content-Type": "application/json; charset=utf-8"}
        assert httpx.post(url, content=body, headers=typed).status_code == 200
        for path in ("/", "/health", "/metrics", "/v1/models", "/v1/nothing"):
            assert httpx.get(live.url + path).headers["x-content-type-options"] == "nosniff"
        page = httpx.get(live.url + "/")
        policy = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "connect-src 'self'" in policy
        assert "'unsafe-inline'" not in policy and policy.count("'sha256-") == 2
        assert "content-security-policy" not in httpx.get(live.url + "/health").headers
    finally:
        live.close()


def test_several_api_keys_open_the_api(engine):
    live = LiveServer(engine, api_keys=("one", "two"))
    try:
        for key, status in (("one", 200), ("two", 200), ("three", 401), ("one,two", 401)):
            headers = {"Authorization": f"Bearer {key}"}
            assert httpx.get(live.url + "/v1/models", headers=headers).status_code == status
        assert httpx.get(live.url + "/v1/models").status_code == 401
    finally:
        live.close()


def test_cli_reads_keys_from_a_file_and_the_environment_and_names_the_run(tmp_path, monkeypatch):
    import argparse

    from minigpt.cli.serve import add_serve_parser, read_api_keys
    from minigpt.errors import MinigptError

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    keys = tmp_path / "keys"
    keys.write_text("# the team's keys\nalpha\n\n  beta  \n")
    monkeypatch.setenv("MINIGPT_API_KEY", "gamma, delta,")
    args = parser.parse_args(["serve", "--model", "runs/x", "--api-key-file", str(keys)])
    assert read_api_keys(args) == ("gamma", "delta", "alpha", "beta")
    monkeypatch.delenv("MINIGPT_API_KEY")
    keys.write_text("# nothing\n\n")
    with pytest.raises(MinigptError, match="holds no key"):
        read_api_keys(args)
    args = parser.parse_args(["serve", "--model", "runs/x", "--api-key-file", str(tmp_path / "n")])
    with pytest.raises(MinigptError, match="cannot read"):
        read_api_keys(args)


def test_the_cli_names_the_run_not_its_path_and_answers_only_loopback_hosts(tmp_path):
    import os
    import subprocess
    import sys

    from minigpt.checkpoints import save_model
    from tests.conftest import SRC

    run = tmp_path / "secret" / "my-run"
    save_model(run, GPT(tiny_config()), step=0)
    (tmp_path / "keys").write_text("k1\nk2\n")
    port = free_port()
    command = ["serve", "--model", str(run), "--port", str(port), "--allowed-host", "my.test"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "minigpt", *command, "--api-key-file", str(tmp_path / "keys")],
        env={**os.environ, "PYTHONPATH": str(SRC), "MINIGPT_API_KEY": "k3"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url)
        assert httpx.get(url + "/health").json()["model"] == "my-run"
        for key, status in (("k1", 200), ("k2", 200), ("k3", 200), ("k4", 401)):
            r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == status
        assert r.json()["error"]["code"] == "invalid_api_key"
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k1"}).json()
        assert [m["id"] for m in models["data"]] == ["my-run"] and "secret" not in str(models)
        for host, status in ((f"localhost:{port}", 200), ("my.test", 200), ("rebound.test", 400)):
            assert httpx.get(url + "/health", headers={"Host": host}).status_code == status
    finally:
        proc.terminate()
        proc.wait(timeout=30)
