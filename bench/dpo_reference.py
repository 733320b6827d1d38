"""DPO training with precomputed reference log-probs against a live reference model, side by side.

    python bench/dpo_reference.py                                  # the CPU demo's shape
    python bench/dpo_reference.py --preset gpt2 --seq-len 1024 --micro-batch 8 \
        --device cuda --dtype bfloat16 --out bench/results/dpo_reference-h100.json

Each mode runs in its own process, so that its peak memory is its own: the Trainer with the DPO
objective over random pairs (prompt half the context, replies the other half), --steps timed
optimizer steps after --warmup. "precomputed" first scores every pair with the starting weights
(timed apart: the one-off reference pass) and trains one model; "model" holds a frozen copy and
runs it on every micro-batch. Memory is the process's peak RSS on the CPU, and peak allocated
CUDA memory on a GPU. Prints a table and, with --out, writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from minigpt.config import DPOSection, LogSection, TrainSection  # noqa: E402
from minigpt.data.preference import RenderedPair  # noqa: E402
from minigpt.device import resolve_dtype  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.train.distributed import DistContext  # noqa: E402
from minigpt.train.dpo import PairBatches, PreferenceObjective, reference_logps  # noqa: E402
from minigpt.train.trainer import Trainer  # noqa: E402

MODES = ("precomputed", "model")
PAD = 50256


def random_pairs(n: int, seq_len: int, seed: int = 0) -> list[RenderedPair]:
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(0, 50257, (k,), generator=g).tolist()  # noqa: E731
    half = seq_len // 2
    return [
        RenderedPair(ids(half), ids(seq_len + 1 - half), ids(seq_len + 1 - half)) for _ in range(n)
    ]


def measure(args: argparse.Namespace, mode: str) -> dict:
    """One mode's reference-pass time, seconds per step and peak memory, in this process."""
    torch.manual_seed(0)
    shape = {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd}
    shape = {k: v for k, v in shape.items() if v is not None}
    config = GPTConfig.from_preset(args.preset, block_size=args.seq_len, **shape)
    device = torch.device(args.device)
    model = GPT(config).to(device)
    pairs = random_pairs(args.micro_batch * (args.warmup + args.steps), args.seq_len)
    dist = DistContext(device=device)
    dtype = resolve_dtype(args.dtype, device)
    reference, reference_pass = None, None
    if mode == "precomputed":
        start = time.perf_counter()
        table = reference_logps(model, pairs, args.micro_batch, PAD, dtype, dist).tolist()
        reference_pass = time.perf_counter() - start
        pairs = [p._replace(reference=tuple(r)) for p, r in zip(pairs, table, strict=True)]
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    train = TrainSection(
        micro_batch=args.micro_batch,
        total_batch_tokens=args.micro_batch * args.seq_len,
        sequence_length=args.seq_len,
        max_lr=1e-5,
        warmup_steps=0,
        max_steps=args.warmup + args.steps,
        device=args.device,
        dtype=args.dtype,
    )
    batches = PairBatches(pairs, args.micro_batch, 0, PAD)
    log = LogSection(progress=False, tensorboard=False)
    with tempfile.TemporaryDirectory() as run_dir:
        objective = PreferenceObjective(DPOSection(), reference)
        trainer = Trainer(model, train, log, batches, run_dir, dist, objective=objective)
        for _ in range(args.warmup):
            trainer.train_step()  # ends in .item(): the step is done when it returns
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        step = (time.perf_counter() - start) / args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "mode": mode,
        "reference_pass_s": reference_pass,
        "pairs_scored": len(pairs) if reference_pass is not None else 0,
        "step_s": step,
        "peak_memory_mib": peak / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt2-micro")
    parser.add_argument("--n-layer", type=int, default=6)  # defaults: the CPU demo's model
    parser.add_argument("--n-head", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8, help="pairs per forward")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args, args.child)))
        return
    forwarded = [
        f"--{name.replace('_', '-')}={value}"
        for name, value in vars(args).items()
        if name not in ("out", "child") and value is not None
    ]
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, *forwarded, "--child", mode]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.splitlines()[-1]))
    print(
        f"{args.preset} {args.n_layer}x{args.n_embd}, {args.micro_batch} pairs x {args.seq_len} "
        f"tokens on {args.device} {args.dtype}, {torch.get_num_threads()} threads"
    )
    print(f"{'reference':>11}  {'step s':>7}  {'peak MiB':>9}  {'reference pass':>15}")
    for row in rows:
        once = "" if row["reference_pass_s"] is None else f"{row['reference_pass_s']:.2f} s"
        print(
            f"{row['mode']:>11}  {row['step_s']:>7.3f}  {row['peak_memory_mib']:>9.0f}  {once:>15}"
        )
    pre, live = rows
    print(
        f"precomputed: {live['step_s'] / pre['step_s']:.2f}x faster steps, "
        f"{live['peak_memory_mib'] - pre['peak_memory_mib']:.0f} MiB less peak memory"
    )
    if args.out:
        record = {
            "command": "python bench/dpo_reference.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"),
            "device": args.device,
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "shape": f"{args.preset} {args.n_layer}x{args.n_head}x{args.n_embd}",
            "micro_batch_pairs": args.micro_batch,
            "seq_len": args.seq_len,
            "dtype": args.dtype,
            "results": rows,
        }
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
