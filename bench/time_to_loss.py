"""Time to the same loss: AdamW against Muon on the same data, model and seed, runs alternated.

    python bench/time_to_loss.py                      # the CPU demo (configs/demo-cpu.toml)
    python bench/time_to_loss.py --rounds 2           # AdamW, Muon, Muon, AdamW: load drift cancels
    python bench/time_to_loss.py --preset gpt2 --data data/fineweb-edu-10B   # one GPU, 124M
    python bench/time_to_loss.py --muon --train.muon_lr=0.03   # overrides for one side only

Each run is a real `minigpt train` (a fresh process and run directory) with the validation loss
measured every `--eval-every` steps and sampling off. The target is the AdamW run's final
validation loss; for each run the bench reports the first evaluation at or below it: its step,
tokens, and training time (the sum of the steps' wall times as the run logged them, evaluations
excluded), and the ratio Muon / AdamW. Because the two optimizers' runs take turns, a machine
that slows down during the bench slows both; the per-step times of the two are also reported as
a ratio, from the same rounds.

The demo's AdamW side is the demo's recipe before Muon (560 steps, max_lr 1e-3); the Muon side
is configs/demo-cpu.toml as it ships. On a GPU (`--preset gpt2`) the sides are
configs/gpt2-124m-fineweb-edu.toml and configs/gpt2-124m-speedrun.toml, cut to `--max-steps`.
Writes bench/results/time_to_loss-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from minigpt.config import load_config  # noqa: E402

RESULTS = REPO / "bench" / "results"

# (config, overrides) of each side, per preset
SIDES = {
    "demo": {
        "adamw": (
            "configs/demo-cpu.toml",
            [
                "--train.optimizer=adamw",
                "--train.max_steps=560",
                "--train.max_lr=1e-3",
                "--train.min_lr=1e-4",
            ],
        ),
        "muon": ("configs/demo-cpu.toml", []),
    },
    "gpt2": {
        "adamw": ("configs/gpt2-124m-fineweb-edu.toml", []),
        "muon": ("configs/gpt2-124m-speedrun.toml", []),
    },
}


def parse_args() -> tuple[argparse.Namespace, dict[str, list[str]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(SIDES), default="demo")
    parser.add_argument("--data", help="a prepared dataset directory (default: the config's)")
    parser.add_argument("--rounds", type=int, default=1, help="AdamW + Muon pairs, alternated")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--max-steps", type=int, help="cut both runs (gpt2: required)")
    parser.add_argument("--out", type=Path, help="keep the run directories here")
    parser.add_argument("--results", type=Path, help="JSON path (default: bench/results/...)")
    # everything after --adamw / --muon (up to the other) overrides that side only
    argv, sides, side = [], {"adamw": [], "muon": []}, None
    for arg in sys.argv[1:]:
        if arg in ("--adamw", "--muon"):
            side = arg[2:]
        elif side:
            sides[side].append(arg)
        else:
            argv.append(arg)
    args = parser.parse_args(argv)
    if args.preset == "gpt2" and not args.max_steps:
        parser.error("--preset gpt2 needs --max-steps (the full recipes run for hours)")
    return args, sides


def run_side(name: str, args, extra: list[str], out: Path) -> dict:
    """One `minigpt train` run; its validation curve and per-step wall times."""
    config, overrides = SIDES[args.preset][name]
    command = [
        sys.executable, "-m", "minigpt", "train", str(REPO / config), "--out", str(out),
        *overrides, f"--train.eval_every={args.eval_every}", "--eval.sample_tokens=0",
        "--train.checkpoint_every=0", "--log.progress=false", "--log.tensorboard=false",
    ]  # fmt: skip
    if args.data:
        command.append(f"--data.dir={args.data}")
    if args.max_steps:
        command.append(f"--train.max_steps={args.max_steps}")
    command += extra
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    print(f"[{name}] {' '.join(command[2:])}", flush=True)
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, cwd=REPO)
    step_tokens = load_config(out / "config.toml").train.total_batch_tokens
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_seconds, curve, elapsed = [], [], 0.0
    for record in records:
        if "train_loss" in record:
            step_seconds.append(step_tokens / record["tokens_per_sec"])
            elapsed += step_seconds[-1]
        if "val_loss" in record:
            step = record["step"]
            curve.append({"step": step, "val_loss": record["val_loss"], "seconds": elapsed,
                          "tokens": step * step_tokens})  # fmt: skip
    return {"command": command[2:], "curve": curve, "step_seconds": step_seconds}


def reached(run: dict, target: float) -> dict | None:
    """The run's first evaluation at or below `target`, or None."""
    return next((point for point in run["curve"] if point["val_loss"] <= target), None)


def main() -> None:
    args, extra = parse_args()
    device = "cuda" if args.preset == "gpt2" else "cpu"
    order = [("adamw", "muon") if r % 2 == 0 else ("muon", "adamw") for r in range(args.rounds)]
    runs: dict[str, list[dict]] = {"adamw": [], "muon": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for r, pair in enumerate(order):
            for name in pair:
                runs[name].append(run_side(name, args, extra[name], root / f"{name}-{r}"))
    summary = summarize(runs)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        if device == "cpu"
        else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        **summary,
        "runs": runs,
    }
    path = args.results or RESULTS / f"time_to_loss-{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print_table(summary)
    print(f"wrote {path}")


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per side, medians over rounds: the final loss, and when the AdamW final loss is reached."""
    target = statistics.median(r["curve"][-1]["val_loss"] for r in runs["adamw"])
    sides = {}
    for name, side_runs in runs.items():
        hits = [reached(r, target) for r in side_runs]
        seconds = [h["seconds"] for h in hits if h]
        sides[name] = {
            "final_val_loss": statistics.median(r["curve"][-1]["val_loss"] for r in side_runs),
            "steps": len(side_runs[0]["step_seconds"]),
            "reached_in_rounds": f"{len(seconds)}/{len(hits)}",
            "step_to_target": statistics.median(h["step"] for h in hits if h) if seconds else None,
            "tokens_to_target": statistics.median(h["tokens"] for h in hits if h)
            if seconds
            else None,
            "seconds_to_target": statistics.median(seconds) if seconds else None,
            "seconds_per_step": statistics.median(s for r in side_runs for s in r["step_seconds"]),
        }
    adamw, muon = sides["adamw"], sides["muon"]
    time_ratio = (
        muon["seconds_to_target"] / adamw["seconds_to_target"]
        if muon["seconds_to_target"]
        else None
    )
    return {
        "target_val_loss": target,
        "sides": sides,
        "time_to_target_ratio": time_ratio,
        "step_time_ratio": muon["seconds_per_step"] / adamw["seconds_per_step"],
    }


def print_table(summary: dict) -> None:
    print(f"\ntarget: AdamW's final validation loss {summary['target_val_loss']:.4f}")
    print(f"{'':6} {'final val':>9} {'steps':>6} {'step@target':>11} {'tokens':>9} {'seconds':>8}")
    for name, side in summary["sides"].items():
        fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
        print(
            f"{name:6} {side['final_val_loss']:9.4f} {side['steps']:6d} "
            f"{fmt(side['step_to_target'], '11.0f')} {fmt(side['tokens_to_target'], '9,.0f')} "
            f"{fmt(side['seconds_to_target'], '8.1f')}"
        )
    ratio = summary["time_to_target_ratio"]
    print(f"Muon / AdamW time to target: {ratio:.3f}x" if ratio else "Muon missed the target")
    print(f"Muon / AdamW time per step: {summary['step_time_ratio']:.3f}x")


if __name__ == "__main__":
    main()
