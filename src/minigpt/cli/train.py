"""`minigpt train`, `sft`, `dpo`, `rm`, `rl` and `plot`: training runs and their curves."""

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
    """The run config of `sft` / `dpo` / `rm` / `rl`, once --init is checked (before torch is imported)."""
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


def _add_tuning_parser(subparsers, verb: str, help: str, description: str, init_help: str):
    """The parser of a stage that starts from --init weights: dpo, rm, rl."""
    parser = subparsers.add_parser(
        verb,
        help=help,
        description=description + " Any config key can be overridden with --section.key=value. "
        f"Multi-GPU: torchrun --nproc_per_node=N -m minigpt {verb} CONFIG --init MODEL ...",
        allow_abbrev=False,
    )
    parser.add_argument("config", help=f"TOML config file, e.g. configs/{verb}-demo-cpu.toml")
    parser.add_argument("--init", default=None, metavar="MODEL", help=init_help)
    add_run_arguments(parser)
    return parser


def add_dpo_parser(subparsers) -> None:
    parser = _add_tuning_parser(
        subparsers,
        "dpo",
        "preference-tune a chat model on (prompt, chosen, rejected) pairs with DPO",
        "Direct Preference Optimization against a frozen reference (the starting "
        "weights). The [data] section names the pairs (data.source: Anthropic/hh-rlhf, a TRL "
        "JSONL, or a conversation source for offline pairs), [dpo] the loss, e.g. "
        "--dpo.beta=0.2.",
        "starting weights, also the frozen reference: a run, checkpoint or Hugging Face "
        "GPT-2 directory, usually an SFT run (optional with --resume: the run's recorded one)",
    )
    parser.set_defaults(handler=run_dpo, takes_overrides=True)


def run_dpo(args: argparse.Namespace) -> int:
    config = fine_tuning_config(args)
    from minigpt.train.dpo import dpo

    resume_from, run_dir = run_paths(args)
    dpo(config, run_dir, resume_from, args.init)
    return 0


def add_rm_parser(subparsers) -> None:
    parser = _add_tuning_parser(
        subparsers,
        "rm",
        "train a reward model on (prompt, chosen, rejected) pairs (Bradley-Terry)",
        "A reward model: the trunk of --init and a scalar head on the last token, trained so "
        "that chosen replies score above rejected ones. [data] names the pairs as for dpo, "
        "[rm] the loss, e.g. --rm.center_rewards_coefficient=0.01.",
        "the trunk's starting weights: a run, checkpoint or Hugging Face GPT-2 directory, "
        "usually an SFT run (optional with --resume: the run's recorded one)",
    )
    parser.set_defaults(handler=run_rm, takes_overrides=True)


def run_rm(args: argparse.Namespace) -> int:
    config = fine_tuning_config(args)
    from minigpt.train.rm import rm

    resume_from, run_dir = run_paths(args)
    rm(config, run_dir, resume_from, args.init)
    return 0


def add_rl_parser(subparsers) -> None:
    parser = _add_tuning_parser(
        subparsers,
        "rl",
        "optimise a chat model online against a reward model or reward functions (GRPO, RLOO)",
        "Online RL: each step samples rl.num_generations replies per prompt with the engine, "
        "scores them (rl.reward_model, rl.reward functions), and takes clipped policy-gradient "
        "steps with a KL leash (rl.beta) to the frozen starting weights. [data] names the "
        "prompts (preference pairs, conversations, or a JSONL of prompts).",
        "starting weights, also the frozen KL reference: a run, checkpoint or Hugging Face "
        "GPT-2 directory, usually an SFT run (optional with --resume: the run's recorded one)",
    )
    parser.set_defaults(handler=run_rl, takes_overrides=True)


def run_rl(args: argparse.Namespace) -> int:
    config = fine_tuning_config(args)
    from minigpt.train.rl import rl

    resume_from, run_dir = run_paths(args)
    rl(config, run_dir, resume_from, args.init)
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
