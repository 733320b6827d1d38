"""Training throughput and peak memory of the real training step, and the chunked output layer
against the plain one, side by side.

    python bench/train_throughput.py --config configs/demo-cpu.toml          # the CPU demo
    python bench/train_throughput.py --preset gpt2 --micro-batch 64 --compile  # one GPU, bf16
    python bench/train_throughput.py --preset gpt2 --micro-batch 16 32 64 --compile --heads chunked
    python bench/train_throughput.py --config configs/demo-cpu.toml --model.n_embd=192  # any key

It times `Trainer.train_step` (prefetched batches, forward, backward, clipping, AdamW: the code
`minigpt train` runs) on random tokens, after warm-up steps that absorb compilation and allocator
growth, with `--accum` defaulting to the config's real accumulation (total_batch_tokens /
(micro_batch x sequence_length)). Each `--heads` variant at each `--micro-batch` runs in its own
fresh process, one after the other, so peak memory is its own (a variant that fails, say out of
memory, is recorded with its error, the others still run, and the exit status is 1): `chunked`
is the model as it is (output layer and cross-entropy in row chunks, no (B, T, V) logits),
`plain` the one-shot `F.cross_entropy(lm_head(x).float())` it replaced. Peak memory is torch's
peak allocation on CUDA and the process's peak resident set on CPUs (with the part the steps
added over the loaded model). MFU is measured against the device's dense peak for the dtype
(GPUs in GPU_PEAK_TFLOPS; `--peak-tflops` for others) and left out on CPUs. Runs from a plain
checkout: no install needed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import minigpt.model  # noqa: E402
from minigpt.config import load_config, parse_override_args  # noqa: E402
from minigpt.device import resolve_device  # noqa: E402
from minigpt.train.distributed import DistContext  # noqa: E402
from minigpt.train.pretrain import build_model  # noqa: E402
from minigpt.train.trainer import Trainer  # noqa: E402


class RandomTokens:
    """A BatchSource of uniform random GPT-2 tokens (throughput and memory do not depend on the
    text; bench/memory.py seeds each rank's own)."""

    ignores_targets = False

    def __init__(self, micro_batch: int, seq_len: int, seed: int = 0):
        self.shape = (micro_batch, seq_len + 1)
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        tokens = torch.randint(0, 50257, self.shape, generator=self.generator)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def plain_cross_entropy(hidden, weight, targets, ignore_index=-100, rows=None):
    """The output layer and loss before chunking: all (B*T, V) logits, then their fp32 copy."""
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="take model and train settings from a config")
    p.add_argument("--preset", default=None, help="model preset (overrides the config)")
    p.add_argument("--micro-batch", type=int, nargs="+", default=None, help="one or several")
    p.add_argument("--seq", type=int, default=None, help="sequence length")
    p.add_argument(
        "--accum", type=int, default=None, help="micro-steps per optimizer step (default: the "
        "config's total_batch_tokens / (micro_batch x sequence_length))",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: the config's)")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU")
    p.add_argument(
        "--heads", nargs="+", choices=["plain", "chunked"], default=["plain", "chunked"],
        help="output-layer variants to compare, each in a fresh process (default: both)",
    )  # fmt: skip
    p.add_argument("--variant", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--variant-micro-batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args, rest = p.parse_known_args()
    args.rest = rest
    args.overrides = parse_override_args(rest)  # --section.key=value, as `minigpt train` takes
    return args


def measure(args: argparse.Namespace) -> dict:
    """One variant, in this process: median step time, tokens/s, MFU, peak memory."""
    if args.variant == "plain":
        minigpt.model.linear_cross_entropy = plain_cross_entropy
    overrides = {
        "model.preset": args.preset,
        "train.micro_batch": args.variant_micro_batch,
        "train.sequence_length": args.seq,
        "train.device": args.device,
        "train.dtype": args.dtype,
        "log.peak_tflops": args.peak_tflops or None,
    }
    if args.preset and args.config is None:
        overrides["model.block_size"] = args.seq  # presets fix their own context otherwise
    overrides = {k: str(v) for k, v in overrides.items() if v is not None}
    config = load_config(args.config, {**overrides, **args.overrides})
    if args.compile:
        config.train.compile = True
    cfg = config.train
    accum = args.accum or max(1, cfg.total_batch_tokens // (cfg.micro_batch * cfg.sequence_length))
    cfg.total_batch_tokens = cfg.micro_batch * cfg.sequence_length * accum
    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    model = build_model(config.model, cfg.sequence_length)
    batches = RandomTokens(cfg.micro_batch, cfg.sequence_length)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, cfg, config.log, batches, run_dir, DistContext(device=device))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for _ in range(args.warmup):
            trainer.train_step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, cpu_times, losses = [], [], []
        for _ in range(args.steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            stats = trainer.train_step()  # returns python floats: the step finished on the device
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            losses.append(stats["train_loss"])
        trainer.batches.close()
    seconds = statistics.median(times)
    tokens_per_sec = cfg.total_batch_tokens / seconds
    result = {
        "head": args.variant,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": {k: v for k, v in model.config.to_dict().items() if k != "dropout"},
        "params_M": round(model.num_params() / 1e6, 2),
        "dtype": str(trainer.dtype).removeprefix("torch."),
        "compile": cfg.compile,
        "micro_batch": cfg.micro_batch,
        "sequence_length": cfg.sequence_length,
        "accum": accum,
        "tokens_per_step": cfg.total_batch_tokens,
        "median_step_s": round(seconds, 4),
        "tokens_per_sec": round(tokens_per_sec, 1),
        # CPU seconds of this process per step: on a shared machine, steadier than wall time
        "median_step_cpu_s": round(statistics.median(cpu_times), 4),
        "gflop_per_token": round(model.flops_per_token(cfg.sequence_length) / 1e9, 4),
        "last_loss": round(losses[-1], 4),
    }
    if device.type == "cuda":
        result["peak_memory_MB"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["peak_rss_MB"] = round(peak, 1)
        result["rss_added_by_steps_MB"] = round(peak - rss_before, 1)
    mfu = trainer.mfu(stats["flops"], seconds)  # every step does the same FLOPs
    if mfu is not None:
        result["mfu"] = round(mfu, 4)
    return result


def run_variant(head: str, micro_batch: int | None) -> dict:
    """One variant in a fresh process: its result, or its error."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", head]
    if micro_batch is not None:
        cmd += ["--variant-micro-batch", str(micro_batch)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{head} variant (micro-batch {micro_batch}) failed:\n{done.stderr[-3000:]}")
        return {"head": head, "micro_batch": micro_batch, "error": done.stderr[-3000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.variant:  # a child: measure one variant, print it as one JSON line
        print(json.dumps(measure(args)))
        return
    command = "python bench/train_throughput.py " + " ".join(sys.argv[1:])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = [
        {**run_variant(head, micro_batch), "date": date, "command": command}
        for micro_batch in args.micro_batch or [None]
        for head in args.heads
    ]
    measured = [r for r in results if "error" not in r]
    memory = "peak_memory_MB" if measured and "peak_memory_MB" in measured[0] else "peak_rss_MB"
    print(
        f"{'head':8} {'micro':>5} {'tokens/s':>10} {'step s':>8} {'step cpu s':>10} "
        f"{memory:>14} {'mfu':>6} {'loss':>8}"
    )
    for r in measured:
        mfu = f"{r['mfu']:.3f}" if "mfu" in r else "-"
        print(
            f"{r['head']:8} {r['micro_batch']:>5} {r['tokens_per_sec']:>10,.0f} "
            f"{r['median_step_s']:>8.3f} {r['median_step_cpu_s']:>10.3f} {r[memory]:>14,.0f} "
            f"{mfu:>6} {r['last_loss']:>8.4f}"
        )
    for micro_batch in sorted({r["micro_batch"] for r in measured}):
        by_head = {r["head"]: r for r in measured if r["micro_batch"] == micro_batch}
        if {"plain", "chunked"} <= set(by_head):
            plain, chunked = by_head["plain"], by_head["chunked"]
            speed = chunked["tokens_per_sec"] / plain["tokens_per_sec"]
            cpu = plain["median_step_cpu_s"] / chunked["median_step_cpu_s"]
            print(
                f"micro-batch {micro_batch}, chunked / plain: tokens/s {speed:.2f}x, "
                f"CPU time per step {cpu:.2f}x less"
            )
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if len(measured) < len(results):
        sys.exit(1)


if __name__ == "__main__":
    main()
