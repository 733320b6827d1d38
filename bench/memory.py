"""Memory per process of the training step under DDP, FSDP and FSDP + activation checkpointing.

    torchrun --standalone --nproc_per_node=2 bench/memory.py --preset gpt2-mini --seq 256
    torchrun --standalone --nproc_per_node=8 bench/memory.py --preset gpt2-xl --seq 1024  # GPUs

Each mode runs `Trainer.train_step` (the code `minigpt train` runs) on random tokens, one after
the other in the same process group, and counts per process, on any device:
- the training state: the bytes of this process's weights, gradients (when AdamW steps) and
  AdamW state, its shards under FSDP;
- the activations saved for the backward pass (every tensor autograd keeps that is not a
  weight), per token, and per token per layer per channel (what scales to other presets);
and on GPUs torch's peak allocation too. It prints the FSDP / DDP ratio of the training state
and, from the measured bytes per parameter and per token, a table of the largest preset that
trains per GPU memory size (computed, not measured: marked as such). `--json PATH` writes all of
it with the date, torch version, machine and exact command. Runs from a plain checkout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from train_throughput import RandomTokens  # noqa: E402

from minigpt.config import LogSection, TrainSection  # noqa: E402
from minigpt.model import GPT, PRESETS, GPTConfig  # noqa: E402
from minigpt.train.distributed import init_distributed, shutdown_distributed  # noqa: E402
from minigpt.train.trainer import Trainer  # noqa: E402

MODES = {  # name -> (train.parallel, train.activation_checkpointing)
    "ddp": ("ddp", False),
    "fsdp": ("fsdp", False),
    "fsdp+ac": ("fsdp", True),
}
TABLE_PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
TABLE_GPU_GB = (16, 24, 40, 80)


def local_bytes(tensors) -> int:
    """Bytes of these tensors held by this process (a DTensor's own shard)."""
    total = 0
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        total += t.numel() * t.element_size()
    return total


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return local_bytes(
        v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
    )


def _storage(t: torch.Tensor) -> torch.UntypedStorage:
    return (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()


class SavedActivations:
    """Counts the bytes autograd saves for the backward pass, weights aside (each storage once)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.storages, self.bytes = model, set(), 0

    def pack(self, t: torch.Tensor):
        weights = {_storage(p).data_ptr() for p in self.model.parameters()}
        storage = _storage(t)
        if storage.data_ptr() not in weights | self.storages:
            self.storages.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def measure(mode: str, config: GPTConfig, args, dist, run_dir: str) -> dict:
    """The state bytes of this process in `mode`, and its saved activations split into a part
    per token and a fixed part (the slope and intercept between micro-batches of
    `args.micro_batch` and twice as many sequences: the chunked output layer keeps a weight
    gradient of the head's size, whatever the number of tokens)."""
    small, large = (step(mode, config, n, args, dist, run_dir) for n in (1, 2))
    tokens = [n * args.micro_batch * args.seq for n in (1, 2)]
    per_token = (large["saved_activation_bytes"] - small["saved_activation_bytes"]) / (
        tokens[1] - tokens[0]
    )
    fixed = small["saved_activation_bytes"] - per_token * tokens[0]
    return {
        **small,
        "activation_bytes_per_token": per_token,
        "activation_bytes_per_token_layer_channel": per_token / (config.n_layer * config.n_embd),
        "activation_fixed_bytes": fixed,
        "activation_fixed_bytes_per_head_param": fixed / (config.vocab_size * config.n_embd),
    }


def step(mode: str, config: GPTConfig, scale: int, args, dist, run_dir: str) -> dict:
    """One training step in `mode` at `scale` x `args.micro_batch` sequences per process: the
    state and saved activation bytes of this process (and torch's peak allocation on GPUs)."""
    gc.collect()  # the previous step's model and optimizer (held in a cycle by the hook)
    if dist.device.type == "cuda":
        torch.cuda.empty_cache()
    parallel, recompute = MODES[mode]
    micro_batch = scale * args.micro_batch
    train = TrainSection(
        micro_batch=micro_batch,
        sequence_length=args.seq,
        total_batch_tokens=micro_batch * args.seq * dist.world_size,
        parallel=parallel,
        activation_checkpointing=recompute,
        device=str(dist.device),
        dtype=args.dtype,
        warmup_steps=1,
        max_steps=2,
    )
    torch.manual_seed(0)
    model = GPT(config)
    batches = RandomTokens(micro_batch, args.seq, seed=dist.rank)
    log = LogSection(progress=False, tensorboard=False)
    trainer = Trainer(model, train, log, batches, run_dir, dist)
    grads = {}

    def count_grads(optimizer, *_) -> None:  # AdamW is about to step: every gradient exists
        grads["bytes"] = local_bytes(
            p.grad for p in trainer.model.parameters() if p.grad is not None
        )

    trainer.optimizer.register_step_pre_hook(count_grads)
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)
    saved = SavedActivations(trainer.model)
    with saved.hooks():
        trainer.train_step()
    result = {
        "mode": mode,
        "params_bytes": local_bytes(trainer.model.parameters()),
        "grads_bytes": grads["bytes"],
        "optimizer_bytes": optimizer_bytes(trainer.optimizer),
    }
    result["state_bytes"] = sum(
        result[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes")
    )
    result["state_bytes_per_param"] = result["state_bytes"] / config_params(config)
    result["saved_activation_bytes"] = saved.bytes
    if dist.device.type == "cuda":
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(dist.device)
    trainer.batches.close()
    return result


def config_params(config: GPTConfig) -> int:
    """Parameters of a model of this shape, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return GPT(config).num_params()


def largest_presets(results: dict[str, dict], world_size: int, gpus: int, tokens: int) -> list[str]:
    """Markdown rows: per GPU memory size, the largest preset whose training state (the measured
    bytes per parameter; FSDP's, measured over `world_size` processes, spread over `gpus`) plus
    saved activations (the measured bytes per token per layer per channel, at `tokens` tokens
    per micro-batch, and the fixed bytes per output-layer parameter) fit. Computed, not
    measured."""
    shapes = {name: GPTConfig.from_preset(name) for name in TABLE_PRESETS}
    sizes = {name: config_params(c) for name, c in shapes.items()}
    rows = []
    for gb in TABLE_GPU_GB:
        cells = []
        for mode, r in results.items():
            per_param = r["state_bytes_per_param"]
            if mode != "ddp":  # shards shrink as 1 / processes
                per_param *= world_size / gpus
            fits = "none"
            for name in TABLE_PRESETS:
                c = shapes[name]
                need = per_param * sizes[name]
                need += (
                    r["activation_bytes_per_token_layer_channel"] * tokens * c.n_layer * c.n_embd
                )
                need += r["activation_fixed_bytes_per_head_param"] * c.vocab_size * c.n_embd
                if need <= gb * 1e9:
                    fits = f"{name} ({need / 1e9:.1f} GB)"
            cells.append(fits)
        rows.append(f"| {gb} GB | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt2-mini", choices=list(PRESETS))
    parser.add_argument("--n-layer", type=int, help="override the preset's depth")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per process")
    parser.add_argument("--dtype", default="auto", help="train.dtype (auto: bf16 on recent GPUs)")
    parser.add_argument(
        "--table-tokens",
        type=int,
        default=4 * 1024,
        help="tokens per micro-batch in the computed table (4 x 1024)",
    )
    parser.add_argument("--table-gpus", type=int, default=8, help="GPUs FSDP shards over there")
    parser.add_argument("--json", type=Path, help="write the results here (rank 0)")
    args = parser.parse_args()  # fmt: skip
    dist = init_distributed("auto", 60)
    shape = {"block_size": max(args.seq, 128)}
    if args.n_layer:
        shape["n_layer"] = args.n_layer
    config = GPTConfig.from_preset(args.preset, **shape)
    with tempfile.TemporaryDirectory() as run_dir:
        results = {mode: measure(mode, config, args, dist, run_dir) for mode in MODES}
    shutdown_distributed(dist)
    if not dist.is_main:
        return
    ratio = results["fsdp"]["state_bytes"] / results["ddp"]["state_bytes"]
    print(f"{args.preset}: {config_params(config) / 1e6:.2f}M parameters, {dist.world_size} "
          f"process(es) on {dist.device}, {args.micro_batch} x {args.seq} tokens per process")  # fmt: skip
    for mode, r in results.items():
        line = (f"{mode:8s} state {r['state_bytes'] / 2**20:8.1f} MiB/process "
                f"({r['state_bytes_per_param']:.2f} B/param)  saved activations "
                f"{r['activation_bytes_per_token_layer_channel']:.1f} B/token/layer/channel "
                f"+ {r['activation_fixed_bytes'] / 2**20:.1f} MiB fixed")  # fmt: skip
        if "cuda_peak_bytes" in r:
            line += f"  cuda peak {r['cuda_peak_bytes'] / 2**20:.0f} MiB"
        print(line)
    print(f"fsdp / ddp training state per process: {ratio:.3f}")
    gpus = args.table_gpus
    header = " | ".join(f"{m} ({gpus} GPUs)" if m != "ddp" else m for m in results)
    table = [f"| GPU memory | {header} |", "|---" * (len(results) + 1) + "|"]
    table += largest_presets(results, dist.world_size, gpus, args.table_tokens)
    print(f"computed: largest preset that trains, {args.table_tokens:,} tokens per micro-batch")
    print("\n".join(table))
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": f"torchrun --standalone --nproc_per_node={dist.world_size} "
                       f"bench/memory.py {' '.join(sys.argv[1:])}",
            "torch": torch.__version__,
            "machine": " ".join(
                filter(None, [platform.machine(), platform.processor(), f"{os.cpu_count()} cores"])
            ),
            "device": str(dist.device) if dist.device.type != "cuda"
                      else torch.cuda.get_device_name(dist.device),
            "world_size": dist.world_size,
            "model": {**config.to_dict(), "params": config_params(config)},
            "micro_batch": args.micro_batch, "seq": args.seq,
            "results": results,
            "ratio_fsdp_to_ddp_state": round(ratio, 4),
            "computed_table": table,
        }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
