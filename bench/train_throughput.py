"""Training throughput: tokens/s and MFU of the real training step for a model shape and batch.

    python bench/train_throughput.py --config configs/demo-cpu.toml          # the CPU demo
    python bench/train_throughput.py --preset gpt2 --micro-batch 64 --compile  # one GPU, bf16
    python bench/train_throughput.py --config configs/demo-cpu.toml --model.n_embd=192  # any key

It times `Trainer.train_step` (forward, backward, clipping, AdamW; the same code `minigpt train`
runs) on random tokens, after warm-up steps that absorb compilation and allocator growth. MFU is
measured against the device's dense bf16 peak (GPUs torch names; `--peak-tflops` for others) and
is left out on CPUs, whose peak we do not know. Results so far were taken on a shared 2-core CPU;
this session had no GPU, so the GPU numbers the issue asks for are still to be recorded in
`bench/results/` by a session that has one (the script runs there unchanged: CUDA, bf16 autocast,
fused AdamW, `--compile`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from minigpt.config import load_config, parse_override_args
from minigpt.train.distributed import DistContext, resolve_device
from minigpt.train.pretrain import build_model
from minigpt.train.trainer import Trainer


class RandomTokens:
    """A BatchSource of uniform random GPT-2 tokens (throughput does not depend on the text)."""

    def __init__(self, micro_batch: int, seq_len: int):
        self.shape = (micro_batch, seq_len + 1)
        self.generator = torch.Generator().manual_seed(0)

    def next_batch(self):
        tokens = torch.randint(0, 50257, self.shape, generator=self.generator)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="take model and train settings from a config")
    p.add_argument("--preset", default=None, help="model preset (overrides the config)")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None, help="sequence length")
    p.add_argument("--accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: the config's)")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    args, rest = p.parse_known_args()
    args.overrides = parse_override_args(rest)  # --section.key=value, as `minigpt train` takes
    return args


def main() -> None:
    args = parse_args()
    overrides = {
        "model.preset": args.preset,
        "train.micro_batch": args.micro_batch,
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
    cfg.total_batch_tokens = cfg.micro_batch * cfg.sequence_length * args.accum
    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    model = build_model(config.model, cfg.sequence_length)
    batches = RandomTokens(cfg.micro_batch, cfg.sequence_length)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, cfg, config.log, batches, run_dir, DistContext(device=device))
        for _ in range(args.warmup):
            trainer.train_step()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            trainer.train_step()  # returns python floats: the step has finished on the device
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens_per_sec = cfg.total_batch_tokens / seconds
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": {k: v for k, v in model.config.to_dict().items() if k != "dropout"},
        "params_M": round(model.num_params() / 1e6, 2),
        "dtype": str(trainer.dtype).removeprefix("torch."),
        "compile": cfg.compile,
        "micro_batch": cfg.micro_batch,
        "sequence_length": cfg.sequence_length,
        "tokens_per_step": cfg.total_batch_tokens,
        "median_step_s": round(seconds, 4),
        "tokens_per_sec": round(tokens_per_sec, 1),
        "gflop_per_token": round(model.flops_per_token(cfg.sequence_length) / 1e9, 4),
    }
    if trainer.peak_flops:
        mfu = model.estimate_mfu(tokens_per_sec, trainer.peak_flops, cfg.sequence_length)
        result["mfu"] = round(mfu, 4)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
