"""Decode throughput of the engine with its KV cache against full re-forwarding, side by side.

    python bench/generate_throughput.py                       # gpt2 shape, random weights, CPU
    python bench/generate_throughput.py --model RUN_DIR --device cuda --batch-sizes 1 32

For each batch size, both paths generate --new-tokens tokens from the same random prompts with
the same sampling; tokens/s counts decode steps only (from the first sampled token to the last),
so the one-off prefill does not flatter either side. Prints a table and, with --out, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from minigpt.engine import Engine, Sampling  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402

N_VOCAB = 50260  # GPT-2 plus the chat tokens


def decode_tokens_per_sec(
    engine: Engine, prompts: list[list[int]], new_tokens: int, seed: int
) -> float:
    """Tokens/s over the decode steps of one generate call (prefill and first sample excluded)."""
    start, produced = None, 0
    for step in engine.stream(prompts, new_tokens, Sampling(top_k=50), seed=seed):
        if start is None:
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        else:
            produced += len(step)
    return produced / (time.perf_counter() - start)


def build_model(args: argparse.Namespace) -> GPT:
    if args.model:
        from minigpt.checkpoint import load_model

        return load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    torch.manual_seed(0)
    config = GPTConfig.from_preset(args.preset)
    return GPT(config).to(device=args.device, dtype=getattr(torch, args.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="run or checkpoint directory (default: random weights)")
    parser.add_argument("--preset", default="gpt2", help="shape for random weights (gpt2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args).eval()
    generator = torch.Generator().manual_seed(0)
    cached, reforward = Engine(model, N_VOCAB), Engine(model, N_VOCAB, use_kv_cache=False)
    engine_name = args.model or f"{args.preset} (random weights)"
    print(
        f"{engine_name} on {args.device} {args.dtype}, {torch.get_num_threads()} threads; "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens"
    )
    print(f"{'batch':>5}  {'cached tok/s':>12}  {'no-cache tok/s':>14}  {'ratio':>6}")
    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(0, 50257, (batch, args.prompt_len), generator=generator).tolist()
        decode_tokens_per_sec(cached, prompts, 8, seed=0)  # warm-up: allocator, kernels
        fast = decode_tokens_per_sec(cached, prompts, args.new_tokens, seed=0)
        slow = decode_tokens_per_sec(reforward, prompts, args.new_tokens, seed=0)
        rows.append({"batch": batch, "cached": fast, "no_cache": slow, "ratio": fast / slow})
        print(f"{batch:>5}  {fast:>12.1f}  {slow:>14.1f}  {fast / slow:>5.1f}x", flush=True)
    if args.out:
        record = {
            "model": engine_name,
            "device": args.device,
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "torch": torch.__version__,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "tokens_per_sec": rows,
        }
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
