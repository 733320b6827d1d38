"""`minigpt <verb>`: a thin command line over the library.

One module per verb family; each has `add_<verb>_parser` functions that declare the flags and
handlers that import the library code they need only when they run, so `minigpt --help` and
`minigpt prepare` start without torch.
"""

from __future__ import annotations

import argparse
import os
import sys

from minigpt.cli import evaluate, export, generate, prepare, serve, train
from minigpt.config import ConfigError
from minigpt.errors import EXIT_INTERRUPTED, MinigptError, TrainingInterrupted

# the verbs' parser builders, in the order `minigpt --help` lists the verbs
VERBS = [
    prepare.add_prepare_parser,
    train.add_train_parser,
    train.add_sft_parser,
    train.add_dpo_parser,
    train.add_rm_parser,
    train.add_rl_parser,
    train.add_plot_parser,
    evaluate.add_eval_parser,
    export.add_export_parser,
    generate.add_generate_parser,
    generate.add_chat_parser,
    serve.add_serve_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minigpt",
        description="A from-scratch GPT-2 toolkit: prepare, train, fine-tune, chat, evaluate.",
    )
    from minigpt import __version__

    parser.add_argument("--version", action="version", version=f"minigpt {__version__}")
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add_parser in VERBS:
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `train`, `sft` and `dpo` pass dotted --section.key overrides through to the config loader
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except TrainingInterrupted as e:  # train, sft and dpo alike: checkpoint written, resume later
        print(f"minigpt: {e}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except MinigptError as e:
        # under torchrun every rank fails alike on a bad config: rank 0 alone says so
        rank = os.environ.get("RANK", "0")
        if rank == "0" or not isinstance(e, ConfigError):
            prefix = "" if rank == "0" else f"[rank {rank}] "
            print(f"{prefix}minigpt {args.verb}: error: {e}", file=sys.stderr, flush=True)
        return 2
