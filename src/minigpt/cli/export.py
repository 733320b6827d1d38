"""`minigpt export`: models in other tools' formats."""

from __future__ import annotations

import argparse


def add_export_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a model for other tools (Hugging Face transformers)",
        description="Write a model in another library's format.",
    )
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    hf = formats.add_parser(
        "hf",
        help="a transformers GPT2LMHeadModel directory with tokenizer and chat template",
    )
    hf.add_argument("checkpoint", metavar="CKPT", help="run or checkpoint directory")
    hf.add_argument("out_dir", metavar="OUT_DIR", help="directory to write")
    hf.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    hf.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    hf.set_defaults(handler=run_export_hf)


def run_export_hf(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from minigpt.checkpoint import load_model
    from minigpt.interop.hf import HFError, export_hf

    out_dir = Path(args.out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        raise HFError(f"{out_dir} is not empty; pass --overwrite to write into it")
    model = load_model(args.checkpoint)
    files = export_hf(model, out_dir, dtype=getattr(torch, args.dtype))
    print(f"wrote {len(files)} files to {out_dir}: {', '.join(f.name for f in files)}")
    return 0
