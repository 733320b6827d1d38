"""`minigpt train`, `minigpt sft`, `minigpt dpo` and `minigpt plot`: training runs and their
curves."""

from __future__ import annotations

import argparse

from minigpt.cli.common import add_run_arguments, run_paths
from minigpt.errors import MinigptError


def add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="pre-train a GPT on token shards (one process, or many under torchrun)",
        description="Pre-train a GPT from a TOML config. Any config key can be overridden with "
        "--section.key=value (or --section.key value), e.g. --train.max_steps=20. "
        "Multi-GPU / multi-node: torchrun --nproc_per_node=N -m minigpt train CONFIG ...",
        allow_abbrev=False,
    )
    parser.add_argument("config", help="TOML config file, e.g. configs/demo-cpu.toml")
    add_run_arguments(parser)
    parser.set_defaults(handler=run_train, takes_overrides=True)


def run_train(args: argparse.Namespace) -> int:
    from minigpt.config import load_config, parse_override_args

    config = load_config(args.config, parse_override_args(args.overrides))  # fail before torch
    from minigpt.train.pretrain import pretrain

    resume_from, run_dir = run_paths(args)
    pretrain(config, run_dir, resume_from)
    return 0


def add_sft_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sft",
        help="fine-tune a model on conversations (one process, or many under torchrun)",
        description="Supervised fine-tuning with the chat template: loss only on assistant "
        "replies. The [data] section names the conversations (data.source, data.format); any "
        "config key can be overridden with --section.key=value, e.g. --train.max_steps=20. "
        "Multi-GPU: torchrun --nproc_per_node=N -m minigpt sft CONFIG --init MODEL ...",
        allow_abbrev=False,
    )
    parser.add_argument("config", help="TOML config file, e.g. configs/sft-demo-cpu.toml")
    parser.add_argument(
        "--init",
        default=None,
        metavar="MODEL",
        help="starting weights: a run, checkpoint or Hugging Face GPT-2 directory "
        "(optional with --resume: the resumed run's weights)",
    )
    add_run_arguments(parser)
    parser.set_defaults(handler=run_sft, takes_overrides=True)


def fine_tuning_config(args: argparse.Namespace):
    """The run config of `sft` / `dpo`, once --init is checked (before torch is imported)."""
    from pathlib import Path

    from minigpt.config import load_config, parse_override_args

    config = load_config(args.config, parse_override_args(args.overrides))
    if args.init is not None and not Path(args.init).exists():
        raise MinigptError(f"--init {args.init}: no such run, checkpoint or model directory")
    if args.init is None and args.resume is None:
        raise MinigptError("--init MODEL is required (a run, checkpoint or HF GPT-2 directory)")
    return config


def run_sft(args: argparse.Namespace) -> int:
    config = fine_tuning_config(args)
    from minigpt.train.sft import sft

    resume_from, run_dir = run_paths(args)
    sft(config, run_dir, resume_from, args.init)
    return 0


def add_dpo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "dpo",
        help="preference-tune a chat model on (prompt, chosen, rejected) pairs with DPO",
        description="Direct Preference Optimization against a frozen reference (the starting "
        "weights). The [data] section names the pairs (data.source: Anthropic/hh-rlhf, a TRL "
        "JSONL, or a conversation source for offline pairs), [dpo] the loss; any config key can "
        "be overridden with --section.key=value, e.g. --dpo.beta=0.2. "
        "Multi-GPU: torchrun --nproc_per_node=N -m minigpt dpo CONFIG --init MODEL ...",
        allow_abbrev=False,
    )
    parser.add_argument("config", help="TOML config file, e.g. configs/dpo-demo-cpu.toml")
    parser.add_argument(
        "--init",
        default=None,
        metavar="MODEL",
        help="starting weights, also the frozen reference: a run, checkpoint or Hugging Face "
        "GPT-2 directory, usually an SFT run (optional with --resume: the run's recorded one)",
    )
    add_run_arguments(parser)
    parser.set_defaults(handler=run_dpo, takes_overrides=True)


def run_dpo(args: argparse.Namespace) -> int:
    config = fine_tuning_config(args)
    from minigpt.train.dpo import dpo

    resume_from, run_dir = run_paths(args)
    dpo(config, run_dir, resume_from, args.init)
    return 0


def add_plot_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="plot train/val loss (and HellaSwag) of one or more runs to a PNG",
        description="Overlay the loss curves of one or more run directories in one PNG.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    parser.add_argument("--out", default=None, help="PNG path (default RUN/loss.png)")
    parser.set_defaults(handler=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from minigpt.train.plot import plot_runs

    out = args.out or Path(args.runs[0]) / "loss.png"
    print(f"wrote {plot_runs(args.runs, out)}")
    return 0
