"""`minigpt prepare`: corpora -> token shards."""

from __future__ import annotations

import argparse
import os

from minigpt.cli.common import parse_count
from minigpt.errors import MinigptError


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
    manifest = prepare_from_args(args)
    print(summarize(manifest, args.out))
    return 0


def prepare_from_args(args: argparse.Namespace) -> dict:
    """Run `minigpt prepare SOURCE ...` from parsed CLI arguments."""
    from minigpt.data import prepare

    if args.source == "builtin":
        corpus = prepare.builtin_corpus()
    elif args.source == "files":
        corpus = prepare.files_corpus(
            args.patterns, text_field=args.text_field, on_error=args.on_error
        )
    elif args.source == "hf":
        corpus = prepare.hf_corpus(
            args.dataset,
            config=args.config,
            split=args.split,
            text_field=args.text_field,
            streaming=args.streaming,
        )
    elif args.source == "fineweb-edu":
        corpus = prepare.fineweb_edu_corpus(args.config)
    else:
        raise MinigptError(f"unknown source {args.source!r}")
    if args.limit_docs is not None:
        corpus = corpus.limited(args.limit_docs)
    return prepare.prepare_corpus(
        args.out,
        corpus,
        shard_tokens=args.shard_tokens,
        val_tokens=args.val_tokens,
        workers=args.workers,
        overwrite=args.overwrite,
    )


def summarize(manifest: dict, out: str | os.PathLike) -> str:
    """A few lines of statistics about a prepared dataset."""
    tokens = manifest["tokens"]
    n_shards = {s: sum(1 for x in manifest["shards"] if x["split"] == s) for s in ("train", "val")}
    lines = [
        f"dataset   {out} ({manifest['name']}, tokenizer {manifest['tokenizer']['name']})",
        f"documents {manifest['documents']:,}",
        f"tokens    {tokens['total']:,} (train {tokens['train']:,} in {n_shards['train']} "
        f"shard(s), val {tokens['val']:,} in {n_shards['val']} shard(s))",
        f"per doc   {tokens['total'] / manifest['documents']:,.1f} tokens on average",
        f"time      {manifest['seconds']:.2f} s "
        f"({tokens['total'] / max(manifest['seconds'], 1e-9):,.0f} tokens/s)",
    ]
    if manifest.get("val_split"):
        lines.append(f"val split {manifest['val_split']}")
    if manifest.get("undecodable_bytes"):
        lines.append(f"warning   {manifest['undecodable_bytes']:,} undecodable bytes became U+FFFD")
    if manifest.get("skipped_records"):
        lines.append(f"warning   {manifest['skipped_records']:,} malformed records skipped, e.g.:")
        lines += [f"          {e}" for e in manifest["errors"][:5]]
    return "\n".join(lines)
