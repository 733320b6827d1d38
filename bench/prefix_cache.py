"""Prefill time of the 10th turn of a conversation with the prefix cache against without it.

    python bench/prefix_cache.py                     # gpt2 shape, random weights, CPU
    python bench/prefix_cache.py --model RUN_DIR --turns 10 --reply-tokens 32 --out R.json

A `ChatSession` (what `minigpt chat` runs) on an engine with a prefix cache holds a conversation
of --turns - 1 exchanges (a system prompt, user messages of about 30 tokens, greedy replies of
up to --reply-tokens), which fills its cache as `minigpt chat` and `minigpt serve` would. Then
the last turn's prompt (the whole history and a new message) is prefilled, timed to its first
token, by that engine and by one without a cache; each of --repeats measurements sends a
different last message, so no measurement reuses another's new tokens. Prints the medians and
their ratio (the goal: at most 0.2x) and, with --out, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from minigpt.chat import ChatSession  # noqa: E402
from minigpt.checkpoints import load_model  # noqa: E402
from minigpt.engine import Engine, Sampling  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.tokenizer import get_tokenizer  # noqa: E402

WORDS = (
    "the river ran past the old mill where children played every summer while their parents "
    "talked about harvests storms prices and the long roads to town"
).split()
GREEDY = Sampling(temperature=0)


def message(i: int, words: int = 24) -> str:
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(words)) + f" ({i})?"


def first_token_seconds(engine: Engine, prompt: list[int]) -> float:
    start = time.perf_counter()
    engine.generate([prompt], 1, GREEDY)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="run or checkpoint directory (default: random weights)")
    parser.add_argument("--preset", default="gpt2", help="shape for random weights (gpt2)")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kv-cache-mb", type=float, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.model) if args.model else GPT(GPTConfig.from_preset(args.preset))
    model.eval()
    tok = get_tokenizer()
    cached = Engine(model, tok.n_vocab, prefix_cache_mb=args.kv_cache_mb)
    plain = Engine(model, tok.n_vocab)
    session = ChatSession(cached, tok, GREEDY, reply_tokens=args.reply_tokens)
    session.set_system("You are a patient assistant who answers questions about the countryside.")
    load_before = os.getloadavg()[0]
    for turn in range(args.turns - 1):
        "".join(session.reply(message(turn)))
    system = [{"role": "system", "content": session.system}]
    prompts = [
        tok.render_for_completion(
            [*system, *session.history, {"role": "user", "content": message(100 + r)}]
        )
        for r in range(args.repeats + 1)
    ]
    first_token_seconds(plain, prompts[-1])  # warm-up of both paths
    first_token_seconds(cached, prompts[-1])
    hits = cached.prefix_cache.hit_tokens
    with_cache = [first_token_seconds(cached, p) for p in prompts[:-1]]
    reused = (cached.prefix_cache.hit_tokens - hits) / args.repeats
    without = [first_token_seconds(plain, p) for p in prompts[:-1]]
    name = args.model or f"{args.preset} (random weights)"
    ratio = statistics.median(with_cache) / statistics.median(without)
    print(
        f"{name} on cpu float32, {torch.get_num_threads()} threads; turn {args.turns}: prompt "
        f"{len(prompts[0])} tokens, {reused:.0f} reused from the cache"
    )
    print(f"prefill to first token, median of {args.repeats}:")
    print(f"  without cache {statistics.median(without):.3f} s")
    print(f"  with cache    {statistics.median(with_cache):.3f} s   ({ratio:.2f}x)")
    if args.out:
        record = {
            "model": name,
            "device": "cpu",
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_before": round(load_before, 1),
            "load_average_1_5_15_min_after": [round(x, 1) for x in os.getloadavg()],
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + " ".join(sys.argv),
            "turn": args.turns,
            "prompt_tokens": len(prompts[0]),
            "reused_tokens": reused,
            "seconds_without_cache": without,
            "seconds_with_cache": with_cache,
            "ratio_of_medians": round(ratio, 3),
        }
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
