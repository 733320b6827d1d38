"""Aggregate tokens/s and time to first token of `minigpt serve` at 1, 4 and 16 concurrent
streaming clients, against the same requests sent one at a time (1 client), in one run.

    python bench/serve_throughput.py                        # gpt2 shape, random weights, CPU
    python bench/serve_throughput.py --model RUN_DIR --device cuda --clients 1 32 --max-batch 32

The server runs as `python -m minigpt serve` in a subprocess (the way people run it), on a free
loopback port, with a random-weight model of --preset saved to a temporary directory unless
--model is given. Every concurrency level sends the same --requests completions (prompts of
different lengths, greedy, --max-tokens each) through a pool of that many streaming clients.
Prints a table and, with --out, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from stream_client import one_request  # noqa: E402

from minigpt.checkpoints import save_model  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402

WORDS = "the a of and to in is it that was for on are with as his they be at one have this"


def run_level(url: str, prompts: list[str], max_tokens: int, clients: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one_request(url, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    ttft = sorted(r["ttft"] if r["ttft"] is not None else wall for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_sec": tokens / wall,
        "ttft_p50": statistics.median(ttft),
        "ttft_p99": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
    }


def start_server(
    model: str, args: argparse.Namespace, extra: list[str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`minigpt serve` on a free loopback port (more flags in `extra`), once healthy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "minigpt", "serve", "--model", model, "--port", str(port)]
    cmd += ["--device", args.device, "--dtype", args.dtype, "--max-batch", str(args.max_batch)]
    cmd += extra or []
    # this checkout first, then whatever the caller's PYTHONPATH holds (gpu_check.sh's packages)
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    if args.threads:  # torch's intra-op threads in the server (OpenMP reads this at start)
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not become healthy in 300 s")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="run or checkpoint directory (default: random weights)")
    parser.add_argument("--preset", default="gpt2", help="shape for random weights (gpt2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per level (16)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (32)")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    parser.add_argument(
        "--threads", type=int, default=None, help="the server's torch CPU threads (default: all)"
    )
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    words = WORDS.split()
    # different lengths (8..38 words), the same for every level
    prompts = [" ".join(words[(i + j) % len(words)] for j in range(8 + 2 * i)) for i in range(16)]
    prompts = [prompts[i % len(prompts)] for i in range(args.requests)]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if not model:
            torch.manual_seed(0)
            model = tmp
            save_model(tmp, GPT(GPTConfig.from_preset(args.preset)), step=0)
        proc, url = start_server(model, args)
        try:
            one_request(url, prompts[0], 4)  # warm-up
            name = args.model or f"{args.preset} (random weights)"
            print(
                f"{name} on {args.device} {args.dtype}, {args.requests} requests x "
                f"{args.max_tokens} tokens, server --max-batch {args.max_batch}"
            )
            print(f"{'clients':>7}  {'tok/s':>8}  {'vs 1':>6}  {'ttft p50':>9}  {'ttft p99':>9}")
            rows = []
            for clients in args.clients:
                row = run_level(url, prompts, args.max_tokens, clients)
                row["speedup"] = row["tokens_per_sec"] / rows[0]["tokens_per_sec"] if rows else 1
                rows.append(row)
                print(
                    f"{clients:>7}  {row['tokens_per_sec']:>8.1f}  {row['speedup']:>5.1f}x  "
                    f"{row['ttft_p50']:>8.2f}s  {row['ttft_p99']:>8.2f}s",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    if args.out:
        record = {
            "model": name,
            "device": args.device,
            "dtype": args.dtype,
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "server_threads": args.threads or "default",
            "load_average_before": round(load_before, 1),
            "load_average_1_5_15_min_after": [round(x, 1) for x in os.getloadavg()],
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + " ".join(sys.argv),
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "levels": rows,
        }
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
