"""A soak of `minigpt serve`: 64 concurrent clients for 120 s on loopback, mixing streamed and
plain greedy requests with clients that disconnect mid-stream, stall on reading, send malformed
bodies and oversized prompts. It checks what must hold however long a server runs:

- no 5xx answer, and every other status the one the request deserves;
- every completed greedy response equal to the same request sent alone (before the soak);
- the server's RSS grows less than --rss-bound-mib after the warm-up (the first quarter);
- at the end the queue and the running batch are back to zero;
- /metrics holds a bounded number of request series, however many requests were made.

    python bench/serve_soak.py                                # 64 clients, 120 s
    python bench/serve_soak.py --clients 16 --seconds 20 --out /tmp/soak.json

The server runs as `python -m minigpt serve` in a subprocess (`serve_throughput.start_server`)
with a small random-weight model. Prints the figures; exits 1 if a check fails. The suite runs
a shortened soak (tests/test_serve_contract.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import SRC, start_server  # noqa: E402

sys.path.insert(0, str(SRC))
from minigpt.checkpoints import save_model  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402

PROMPTS = ["Once upon a time", "The king said", "To be, or not", "Hello there,", "In the"]
MAX_TOKENS = 12
MAX_TOTAL_CHARS = 4000  # the server's --max-total-chars: an oversized prompt is one past it
KINDS = ("plain", "stream", "chat", "disconnect", "stall", "malformed", "oversized")
# what each kind of request must get back (a disconnected client reads no status at the end)
EXPECTED = {"plain": 200, "stream": 200, "chat": 200, "disconnect": 200, "stall": 200,
            "malformed": 400, "oversized": 400}  # fmt: skip


def completion(prompt: str) -> dict:
    return {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}


def chat(prompt: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0}  # fmt: skip


def streamed_text(lines, chat_format: bool) -> str:
    text = ""
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        choice = json.loads(line[6:])["choices"][0]
        text += (choice["delta"].get("content") or "") if chat_format else choice["text"]
    return text


def references(url: str) -> dict[tuple[str, str], str]:
    """Each greedy request's text, sent alone to the idle server."""
    out = {}
    for prompt in PROMPTS:
        r = httpx.post(url + "/v1/completions", json=completion(prompt), timeout=60)
        out["completion", prompt] = r.json()["choices"][0]["text"]
        r = httpx.post(url + "/v1/chat/completions", json=chat(prompt), timeout=60)
        out["chat", prompt] = r.json()["choices"][0]["message"]["content"]
    return out


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: Counter = Counter()
        self.kinds: Counter = Counter()
        self.mismatches: list[str] = []
        self.unexpected: list[str] = []

    def record(self, kind: str, status: int, text: str | None = None, want: str | None = None):
        with self.lock:
            self.kinds[kind] += 1
            self.statuses[status] += 1
            if status != EXPECTED[kind]:
                self.unexpected.append(f"{kind}: {status}")
            if text is not None and text != want:
                self.mismatches.append(f"{kind}: {text!r} != {want!r}")


def one_request(client: httpx.Client, url: str, kind: str, prompt: str, refs, tally, rng):
    if kind == "plain":
        r = client.post(url + "/v1/completions", json=completion(prompt))
        text = r.json()["choices"][0]["text"] if r.status_code == 200 else None
        tally.record(kind, r.status_code, text, refs["completion", prompt])
    elif kind == "chat":
        r = client.post(url + "/v1/chat/completions", json={**chat(prompt), "stream": True})
        text = streamed_text(r.text.splitlines(), chat_format=True)
        tally.record(kind, r.status_code, text, refs["chat", prompt])
    elif kind in ("stream", "stall"):
        body = {**completion(prompt), "stream": True}
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(lines)
            if kind == "stall":  # stop reading for a while: the server must not wait on us
                time.sleep(rng.uniform(0.5, 3))
            text = streamed_text([first, *lines], chat_format=False)
        tally.record(kind, r.status_code, text, refs["completion", prompt])
    elif kind == "disconnect":
        body = {"prompt": prompt, "max_tokens": 200, "temperature": 0.8, "stream": True}
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(rng.randint(1, 4)):
                next(lines)
        tally.record(kind, r.status_code)  # leaving the block closes the connection mid-stream
    elif kind == "malformed":
        garbage = rng.choice([b'{"prompt": "x",', b"\xff\xfe", b'{"prompt": 5}', b"[[[[", b"{}"])
        r = client.post(url + "/v1/completions", content=garbage,
                        headers={"Content-Type": "application/json"})  # fmt: skip
        tally.record(kind, r.status_code)
    else:  # oversized: a prompt one character over the server's cap
        r = client.post(url + "/v1/completions", json={"prompt": "x" * (MAX_TOTAL_CHARS + 1)})
        tally.record(kind, r.status_code)


def client_loop(url: str, seed: int, deadline: float, refs, tally: Tally) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=120) as client:
        while time.monotonic() < deadline:
            one_request(client, url, rng.choice(KINDS), rng.choice(PROMPTS), refs, tally, rng)


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) / 1024


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M)[1])


def soak(url: str, pid: int, clients: int, seconds: float, rss_bound_mib: float) -> dict:
    """Run the soak against a live server; the figures and the failed checks ("failures")."""
    refs = references(url)
    tally = Tally()
    start = time.monotonic()
    deadline = start + seconds
    samples: list[tuple[float, float]] = []
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client_loop, url, i, deadline, refs, tally) for i in range(clients)]
        while not all(f.done() for f in futures):
            samples.append((time.monotonic() - start, rss_mib(pid)))
            time.sleep(0.5)
        errors = [repr(f.exception()) for f in futures if f.exception()]
    warm = [rss for t, rss in samples if t >= seconds / 4]
    rss_warm, rss_end, rss_max = warm[0], warm[-1], max(warm)
    settle = time.monotonic() + 10  # cancelled streams leave the batch at the next step
    while True:
        text = httpx.get(url + "/metrics").text
        queue, batch = metric(text, "minigpt_queue_depth"), metric(text, "minigpt_batch_size")
        if (queue == batch == 0) or time.monotonic() > settle:
            break
        time.sleep(0.1)
    series = len(re.findall(r"^minigpt_requests_total\{", text, re.M))
    failures = [*errors, *tally.unexpected[:10], *tally.mismatches[:10]]
    if any(status >= 500 for status in tally.statuses):
        failures.append(f"5xx answers: {dict(tally.statuses)}")
    if rss_max - rss_warm >= rss_bound_mib:
        failures.append(f"RSS grew {rss_max - rss_warm:.1f} MiB after warm-up")
    if queue or batch:
        failures.append(f"queue {queue}, batch {batch} at the end")
    if series > 20:
        failures.append(f"{series} request series in /metrics")
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": sum(tally.kinds.values()),
        "by_kind": dict(tally.kinds),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "greedy_compared": sum(tally.kinds[k] for k in ("plain", "stream", "chat", "stall")),
        "greedy_mismatches": len(tally.mismatches),
        "rss_mib_after_warmup": round(rss_warm, 1),
        "rss_mib_end": round(rss_end, 1),
        "rss_mib_max": round(rss_max, 1),
        "rss_growth_mib": round(rss_max - rss_warm, 1),
        "rss_bound_mib": rss_bound_mib,
        "queue_depth_end": queue,
        "batch_size_end": batch,
        "request_series": series,
        "failures": failures,
    }


def soak_server(clients: int, seconds: float, rss_bound_mib: float, max_batch: int = 16) -> dict:
    """Start a server on a small random-weight model, soak it, stop it."""
    server = argparse.Namespace(device="cpu", dtype="float32", max_batch=max_batch, threads=1)
    extra = ["--max-queue", "128", "--max-total-chars", str(MAX_TOTAL_CHARS)]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=256)
        save_model(tmp, GPT(config), step=0)
        proc, url = start_server(tmp, server, extra)
        try:
            return soak(url, proc.pid, clients, seconds, rss_bound_mib)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--rss-bound-mib", type=float, default=32.0)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    result = soak_server(args.clients, args.seconds, args.rss_bound_mib)
    print(json.dumps(result, indent=2))
    if args.out:
        record = {
            **result,
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "load_average_before": round(load_before, 1),
            "load_average_1_5_15_min_after": [round(x, 1) for x in os.getloadavg()],
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + " ".join(sys.argv),
        }
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    raise SystemExit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
