"""`minigpt prepare`: corpora -> token shards."""

from __future__ import annotations

import argparse

from minigpt.cli.common import parse_count


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
