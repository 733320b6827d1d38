"""Decode speed in llama.cpp (GGUF f32, f16, q8_0) against minigpt's engine, side by side.

    python bench/gguf_decode.py                       # gpt2 shape (124M), random weights, CPU
    python bench/gguf_decode.py --model RUN_DIR --new-tokens 128 --out bench/results/x.json

Exports the model to the three GGUF types (file sizes reported), then, in rounds that alternate
between the contenders so that load on a shared machine hits them alike, generates --new-tokens
tokens greedily after the same random prompt with one sequence at a time, as a chat does. Tokens/s
counts the decode steps only (first new token to last) and is wall-clock as a Python caller sees
it, through minigpt's `Engine.stream` (packed float32 and --quantize int8, as `generate` runs
them) and llama-cpp-python's `Llama.generate`. Both use the same number of CPU threads. Prints a
table (median over rounds) and, with --out, writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import llama_cpp  # noqa: E402

from minigpt.engine import Engine, Sampling  # noqa: E402
from minigpt.interop.gguf import FILE_TYPES, export_gguf, llama_cpp_plain_buffers  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.quantize import pack_for_cpu, quantize_int8  # noqa: E402

N_VOCAB = 50260  # GPT-2 plus the chat tokens


def minigpt_tokens_per_sec(engine: Engine, prompt: list[int], new_tokens: int) -> float:
    start, produced = None, 0
    for _ in engine.stream([prompt], new_tokens, Sampling(temperature=0)):
        if start is None:
            start = time.perf_counter()
        else:
            produced += 1
    return produced / (time.perf_counter() - start)


def llama_tokens_per_sec(llm: llama_cpp.Llama, prompt: list[int], new_tokens: int) -> float:
    start, produced = None, 0
    llm.reset()  # no prefix reuse from the previous round
    for _ in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0):
        if start is None:
            start = time.perf_counter()
        else:
            produced += 1
            if produced == new_tokens - 1:
                break
    return produced / (time.perf_counter() - start)


def build_model(args: argparse.Namespace) -> GPT:
    if args.model:
        from minigpt.checkpoints import load_model

        return load_model(args.model)
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset(args.preset))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="run or checkpoint directory (default: random weights)")
    parser.add_argument("--preset", default="gpt2", help="shape for random weights (gpt2)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads, both")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args).eval()
    context = min(model.config.block_size, args.prompt_len + args.new_tokens)
    prompt = torch.randint(0, 50257, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.tolist()
    # the engine as `minigpt generate` runs it on the CPU: packed float32, and --quantize int8
    contenders = {
        "minigpt engine f32 (packed)": Engine(pack_for_cpu(copy.deepcopy(model)), N_VOCAB),
        "minigpt engine int8": Engine(quantize_int8(copy.deepcopy(model)), N_VOCAB),
    }
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for file_type in FILE_TYPES:
            start = time.perf_counter()
            path = export_gguf(model, Path(tmp) / f"model-{file_type}.gguf", file_type)
            sizes[file_type] = (path.stat().st_size, time.perf_counter() - start)
            with llama_cpp_plain_buffers():
                contenders[f"llama.cpp {file_type}"] = llama_cpp.Llama(
                    str(path), n_ctx=context, n_threads=args.threads, verbose=False
                )
        speeds = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, runner in contenders.items():
                measure = (
                    minigpt_tokens_per_sec if name.startswith("minigpt") else llama_tokens_per_sec
                )
                speeds[name].append(measure(runner, prompt, args.new_tokens))
    base = statistics.median(speeds["minigpt engine f32 (packed)"])
    name = args.model or f"{args.preset} (random weights)"
    print(
        f"{name}: {args.threads} threads, batch 1, prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens, median of {args.rounds} rounds"
    )
    print(f"{'':28}  {'tok/s':>7}  {'vs minigpt':>10}  {'file MiB':>8}  {'export s':>8}")
    rows = []
    for contender, values in speeds.items():
        file_type = contender.removeprefix("llama.cpp ")
        size, export_s = sizes.get(file_type, (None, None))
        median = statistics.median(values)
        rows.append(
            {
                "contender": contender,
                "tokens_per_sec": round(median, 1),
                "all_rounds": [round(v, 1) for v in values],
                "vs_minigpt": round(median / base, 2),
                "file_bytes": size,
                "export_seconds": None if export_s is None else round(export_s, 1),
            }
        )
        mib = "" if size is None else f"{size / 2**20:8.1f}"
        secs = "" if export_s is None else f"{export_s:8.1f}"
        print(f"{contender:28}  {median:7.1f}  {median / base:9.2f}x  {mib:>8}  {secs:>8}")
    if args.out:
        result = {
            "bench": "gguf_decode",
            "command": " ".join(["python", *sys.argv]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "torch": torch.__version__,
            "llama_cpp_python": llama_cpp.__version__,
            "model": name,
            "threads": args.threads,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "results": rows,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
