"""F.linear (MKL's sgemm on the plain weight) against `PackedLinear` (oneDNN on the weight
reordered once, `minigpt.quantize.pack_for_cpu`), side by side in one run.

    python bench/linear_kernels.py                         # gpt2 shapes, 1 and 2 threads
    python bench/linear_kernels.py --threads 2 --out bench/results/linear_kernels-cpu.json

For each thread count: the time of each of GPT-2's Linear shapes (one block's four, each through
the 12 blocks' distinct matrices as a step meets them, and the 768 -> 50,304 head) at the row
counts a decode step sees, then a whole decode step of a Batcher (random gpt2-shaped weights,
prompts of different lengths, greedy) with the model as loaded and packed, and whether the two
generate the same tokens. Each time is the best of --repeats runs
(other jobs on a shared machine only add time); the ratios are F.linear's time over the packed
one's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from minigpt.engine import Engine, Sampling  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.quantize import PackedLinear, pack_for_cpu  # noqa: E402

N_VOCAB = 50260


def best_ms(fn, calls: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1000


def layer_shapes(config: GPTConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each Linear a decode step runs: per block, then the head."""
    C = config.n_embd
    return {
        "block attn.c_attn": (3 * C, C),
        "block attn.c_proj": (C, C),
        "block mlp.c_fc": (4 * C, C),
        "block mlp.c_proj": (C, 4 * C),
        "head": (config.vocab_size, C),
    }


@torch.inference_mode()
def time_layers(config: GPTConfig, rows: list[int], repeats: int) -> list[dict]:
    """ms per call of each shape, F.linear and packed: a block's shape through n_layer distinct
    matrices in turn, as a step meets them (one matrix called again would sit in the cache)."""
    results = []
    for name, (n_out, n_in) in layer_shapes(config).items():
        count = 1 if name == "head" else config.n_layer
        linears = [torch.nn.Linear(n_in, n_out, bias=name != "head") for _ in range(count)]
        packed = [PackedLinear(lin.weight, lin.bias) for lin in linears]
        calls = 4 if name == "head" else 1
        for m in rows:
            x = torch.randn(m, n_in)

            def plain_pass(x=x, linears=linears):
                for lin in linears:
                    F.linear(x, lin.weight, lin.bias)

            def packed_pass(x=x, packed=packed):
                for lin in packed:
                    lin(x)

            plain = best_ms(plain_pass, calls, repeats) / count
            fast = best_ms(packed_pass, calls, repeats) / count
            results.append(
                {
                    "layer": name,
                    "rows": m,
                    "f_linear_ms": plain,
                    "packed_ms": fast,
                    "ratio": plain / fast,
                }
            )
    return results


def decode_steps(model: GPT, packed: GPT, batch: int, steps: int, repeats: int) -> dict:
    """ms per decode step of `batch` rows, as loaded and packed (alternating), and their tokens."""
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, 50257, (8 + 3 * i,), generator=gen).tolist() for i in range(batch)]
    times: dict[str, float] = {"f_linear_ms": float("inf"), "packed_ms": float("inf")}
    tokens = {}
    for _ in range(repeats):
        for key, m in (("f_linear_ms", model), ("packed_ms", packed)):
            batcher = Engine(m, N_VOCAB).batcher(batch)
            seqs = [batcher.submit(p, steps + 4, Sampling(temperature=0))[0] for p in prompts]
            for _ in range(3):  # prefill, join, warm-up
                batcher.step()
            times[key] = min(times[key], best_ms(batcher.step, steps, 1))
            while not batcher.idle:
                batcher.step()
            tokens[key] = [s.tokens for s in seqs]
    return {"batch": batch, **times, "ratio": times["f_linear_ms"] / times["packed_ms"],
            "same_tokens": tokens["f_linear_ms"] == tokens["packed_ms"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 15, 16, 17, 32])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPTConfig.from_preset(args.preset)
    model = GPT(config).eval()
    packed = pack_for_cpu(copy.deepcopy(model))
    runs = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        layers = time_layers(config, args.rows, args.repeats)
        print(f"{threads} thread(s), ms per call (F.linear / packed = ratio)")
        for r in layers:
            print(f"  {r['layer']:18} rows {r['rows']:>3}: {r['f_linear_ms']:7.2f} / "
                  f"{r['packed_ms']:7.2f} = {r['ratio']:.2f}x")  # fmt: skip
        steps = [decode_steps(model, packed, b, args.steps, args.repeats) for b in args.batch_sizes]
        for s in steps:
            print(f"  decode step, {s['batch']:>2} rows: {s['f_linear_ms']:6.1f} / "
                  f"{s['packed_ms']:6.1f} ms = {s['ratio']:.2f}x; same greedy tokens: "
                  f"{s['same_tokens']}", flush=True)  # fmt: skip
        runs.append({"threads": threads, "layers": layers, "decode_steps": steps})
    if args.out:
        record = {
            "model": f"{args.preset} shapes (random weights)",
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python bench/linear_kernels.py " + " ".join(sys.argv[1:]),
            "load_average": os.getloadavg(),
            "runs": runs,
        }
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
