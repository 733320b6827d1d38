"""`minigpt <verb>`: a thin command line over the library.

Each verb has an `add_<verb>_parser` that declares its flags and a handler that imports the library
code it needs only when it runs, so `minigpt --help` and `minigpt prepare` start without torch.
"""

from __future__ import annotations

import argparse
import sys

from minigpt.errors import MinigptError


def parse_count(text: str) -> int:
    """Token counts with an optional suffix: 100M, 10k, 2G, 1e8."""
    scale = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}
    try:
        if text and text[-1] in scale:
            return int(float(text[:-1]) * scale[text[-1]])
        return int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 100M, 65536)") from None


# ---------------------------------------------------------------------------------------- prepare
def add_prepare_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="tokenize a corpus into GPT-2 token shards",
        description="Tokenize a corpus with the exact GPT-2 BPE into .bin token shards.",
    )
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")

    def common(p: argparse.ArgumentParser, shard_tokens: str, val_tokens: str | None) -> None:
        p.add_argument("--out", required=True, help="output dataset directory")
        p.add_argument(
            "--shard-tokens",
            type=parse_count,
            default=parse_count(shard_tokens),
            help=f"tokens per shard (default {shard_tokens})",
        )
        p.add_argument(
            "--val-tokens",
            type=parse_count,
            default=None if val_tokens is None else parse_count(val_tokens),
            help="tokens at the start that form the validation split "
            + (
                "(default: the whole first shard)"
                if val_tokens is None
                else f"(default {val_tokens})"
            ),
        )
        p.add_argument(
            "--workers", type=int, default=None, help="tokenizer threads (default: CPUs)"
        )
        p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
        p.add_argument(
            "--limit-docs", type=int, default=None, help="stop after this many documents"
        )

    fw = sources.add_parser("fineweb-edu", help="FineWeb-Edu from the Hugging Face hub (streaming)")
    fw.add_argument("--config", default="sample-10BT", help="dataset config (default sample-10BT)")
    common(fw, "100M", None)

    hf = sources.add_parser("hf", help="any hub dataset, or one saved with save_to_disk")
    hf.add_argument("dataset", help="hub name (user/name) or a local save_to_disk directory")
    hf.add_argument("--name", dest="config", default=None, help="dataset config name")
    hf.add_argument("--split", default="train")
    hf.add_argument("--text-field", default="text")
    hf.add_argument("--no-streaming", dest="streaming", action="store_false")
    common(hf, "100M", None)

    files = sources.add_parser("files", help="local .txt / .jsonl / .parquet files")
    files.add_argument("patterns", nargs="+", metavar="GLOB", help="files or glob patterns")
    files.add_argument("--text-field", default="text", help="field of JSONL/Parquet records")
    files.add_argument(
        "--on-error",
        choices=["stop", "skip"],
        default="stop",
        help="on a malformed record: stop with an error (default) or skip it and count it",
    )
    common(files, "100M", None)

    builtin = sources.add_parser("builtin", help="the bundled public-domain corpus (Shakespeare)")
    common(builtin, "100M", "128k")
    parser.set_defaults(handler=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from minigpt.data import prepare

    manifest = prepare.prepare_from_args(args)
    print(prepare.summarize(manifest, args.out))
    return 0


# ------------------------------------------------------------------------------------------ train
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
    parser.add_argument("--out", default=None, help="run directory (default runs/<config>-<time>)")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="latest|PATH",
        help="continue a run: 'latest' (its newest complete checkpoint; needs --out), "
        "a run directory, or a checkpoint directory",
    )
    parser.set_defaults(handler=run_train, takes_overrides=True)


def run_train(args: argparse.Namespace) -> int:
    from minigpt.config import load_config, parse_override_args

    config = load_config(args.config, parse_override_args(args.overrides))  # fail before torch
    from minigpt.train.pretrain import default_run_dir, pretrain, resume_source

    resume_from, run_dir = None, args.out or default_run_dir(args.config)
    if args.resume is not None:
        resume_from, run_dir = resume_source(args.resume, args.out)
    pretrain(config, run_dir, resume_from)
    return 0


# ------------------------------------------------------------------------------------------- plot
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


# ------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minigpt",
        description="A from-scratch GPT-2 toolkit: prepare, train, fine-tune, chat, evaluate.",
    )
    from minigpt import __version__

    parser.add_argument("--version", action="version", version=f"minigpt {__version__}")
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    add_prepare_parser(subparsers)
    add_train_parser(subparsers)
    add_plot_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `train` passes dotted --section.key overrides through to the config loader
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MinigptError as e:
        print(f"minigpt {args.verb}: error: {e}", file=sys.stderr)
        return 2
