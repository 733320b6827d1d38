"""Where a decode step's time goes: torch.profiler over steady decode steps of a Batcher.

    python bench/profile_decode.py                        # gpt2 shape, random weights, 1 thread
    python bench/profile_decode.py --batch-sizes 1 16 --quantize int8 --out profile.json
    python bench/profile_decode.py --unpacked             # float32 through F.linear (MKL)

The float model is packed for oneDNN as generate, chat and serve run it (`pack_for_cpu`) unless
--unpacked. For each batch size, fills that many rows with 16-token prompts, decodes a few warm-up
steps, then profiles --steps steps and splits their wall time into the block's Linear layers, the
output head, attention, cache writes, the other operators (LayerNorm, GELU, adds, sampling, ...)
and what is left outside any operator (Python and dispatch). The weight bytes one step reads,
over the matmuls' time, give the bandwidth they reach.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from minigpt.engine import Engine, Sampling  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402

N_VOCAB = 50260
# top-level operator names, by where their time goes
LINEAR = {"aten::linear", "quantized::linear_dynamic", "mkldnn::_linear_pointwise"}
ATTENTION = {"aten::scaled_dot_product_attention"}
CACHE = {"aten::index_put_", "aten::copy_", "aten::slice", "aten::select", "aten::index"}


def top_level(prof) -> dict[str, tuple[int, float]]:
    """(calls, CPU us) of each operator called from Python (not from inside another one)."""
    totals: dict[str, list] = {}
    for event in prof.events():
        if event.cpu_parent is not None:
            continue
        if not event.name.startswith(("aten::", "quantized::", "mkldnn::", "head")):
            continue
        entry = totals.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += event.cpu_time_total
    return {k: (n, us) for k, (n, us) in totals.items()}


def step_ms(batcher, steps: int, repeats: int = 3) -> float:
    """The fastest of `repeats` runs of `steps` steps, per step (other jobs only add time)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            batcher.step()
        best = min(best, (time.perf_counter() - start) * 1000 / steps)
    return best


def overhead_ms(n_layer: int, batch: int, steps: int) -> float:
    """A step of a model as deep as the profiled one but with almost no weights (width 96,
    256-token vocabulary): the same operators on tiny tensors, so about the step's fixed cost
    of Python, dispatch and allocation."""
    config = GPTConfig(n_layer=n_layer, n_head=12, n_embd=96, vocab_size=256, block_size=1024)
    engine = Engine(GPT(config).eval(), 256)
    batcher = engine.batcher(batch)
    for p in range(batch):
        batcher.submit([p + 1] * 16, 4 * steps + 12, Sampling(temperature=0))
    for _ in range(6):
        batcher.step()
    return step_ms(batcher, steps)


def profile_batch(engine: Engine, batch: int, steps: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, 50257, (batch, 16), generator=gen).tolist()
    batcher = engine.batcher(batch)
    for p in prompts:
        batcher.submit(p, 5 * steps + 12, Sampling(temperature=0))
    for _ in range(6):  # prefill, join, warm-up
        batcher.step()
    head = engine.model.lm_head
    ranges = []  # the head's operators run inside a "head" range, so they are not top-level

    def enter(module, args):
        ranges.append(record_function("head"))
        ranges[-1].__enter__()

    hooks = [
        head.register_forward_pre_hook(enter),
        head.register_forward_hook(lambda m, a, out: ranges.pop().__exit__(None, None, None)),
    ]
    with profile(activities=[ProfilerActivity.CPU]):  # the profiler's own start-up
        batcher.step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            batcher.step()
    wall_ms = (time.perf_counter() - start) * 1000 / steps
    for h in hooks:
        h.remove()
    ops = top_level(prof)
    per_step = {name: (n / steps, us / 1000 / steps) for name, (n, us) in ops.items()}
    head_ms = per_step.get("head", (0, 0.0))[1]
    linear_ms = sum(ms for name, (_, ms) in per_step.items() if name in LINEAR)
    attention_ms = sum(ms for name, (_, ms) in per_step.items() if name in ATTENTION)
    cache_ms = sum(ms for name, (_, ms) in per_step.items() if name in CACHE)
    ops_ms = sum(ms for _, ms in per_step.values())
    n_ops = sum(n for n, _ in per_step.values())
    plain_ms = step_ms(batcher, steps)  # without the profiler's own overhead
    return {
        "batch": batch,
        "step_ms": plain_ms,
        "profiled_step_ms": wall_ms,
        "block_linears_ms": linear_ms,
        "head_ms": head_ms,
        "attention_ms": attention_ms,
        "cache_ms": cache_ms,
        "other_ops_ms": ops_ms - linear_ms - head_ms - attention_ms - cache_ms,
        "outside_ops_ms": wall_ms - ops_ms,
        "fixed_cost_ms": overhead_ms(engine.model.config.n_layer, batch, steps),
        "top_level_ops_per_step": n_ops,
        "ops": {k: v for k, v in sorted(per_step.items(), key=lambda kv: -kv[1][1])[:25]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quantize", choices=["int8"])
    parser.add_argument(
        "--unpacked", action="store_true", help="float32 Linears through F.linear, not oneDNN"
    )
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.preset)).eval()
    weight_bytes = sum(  # counted before the layers that hold no nn.Parameters replace them
        p.numel() * p.element_size() for n, p in model.named_parameters() if "wpe" not in n
    )
    if args.quantize:
        from minigpt.quantize import quantize_int8

        model = quantize_int8(model)
    elif not args.unpacked:
        from minigpt.quantize import pack_for_cpu

        model = pack_for_cpu(model)
    engine = Engine(model, N_VOCAB)
    rows = []
    for batch in args.batch_sizes:
        row = profile_batch(engine, batch, args.steps, seed=batch)
        matmul_ms = row["block_linears_ms"] + row["head_ms"]
        row["weight_gb_per_s"] = None if args.quantize else weight_bytes / matmul_ms / 1e6
        rows.append(row)
        print(
            f"batch {batch:>2}: step {row['step_ms']:.1f} ms (profiled {row['profiled_step_ms']:.1f})"
            f"; linears {row['block_linears_ms']:.1f}, head {row['head_ms']:.1f}, attention "
            f"{row['attention_ms']:.1f}, cache {row['cache_ms']:.1f}, other ops "
            f"{row['other_ops_ms']:.1f}, outside ops {row['outside_ops_ms']:.1f} ms; fixed cost "
            f"{row['fixed_cost_ms']:.1f} ms; "
            f"{row['top_level_ops_per_step']:.0f} ops/step",
            flush=True,
        )
        for name, (n, ms) in list(row["ops"].items())[:12]:
            print(f"    {name:40} {n:6.0f} calls {ms:8.2f} ms")
    if args.out:
        record = {
            "model": f"{args.preset} (random weights)",
            "quantize": args.quantize,
            "linears": "int8" if args.quantize else "F.linear" if args.unpacked else "packed",
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python bench/profile_decode.py " + " ".join(sys.argv[1:]),
            "load_average": os.getloadavg(),
            "steps": rows,
        }
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
