"""One streamed greedy completion against an OpenAI-compatible `/v1/completions`, timed: what
bench/serve_throughput.py and bench/serve_vs_llamacpp.py send (no minigpt import, so that
either can measure any server, or another checkout's minigpt)."""

from __future__ import annotations

import json
import time

import httpx


def one_request(url: str, prompt: str, max_tokens: int, extra: dict | None = None) -> dict:
    """Time to first text and tokens of one streamed greedy completion; `extra`: more body
    keys (bench/serve_vs_llamacpp.py's llama-server options)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    body.update(extra or {})
    start, first, chunks, usage, finish = time.perf_counter(), None, 0, None, None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{url}: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - start
                finish = choice.get("finish_reason") or finish
    # tokens: what the server counted, else the text chunks streamed (one token each, but
    # bytes of an unfinished UTF-8 character wait for the rest)
    return {
        "ttft": first,
        "tokens": usage if usage is not None else chunks,
        "chunks": chunks,
        "finish": finish,
    }
