"""`minigpt export`: models in other tools' formats."""

from __future__ import annotations

import argparse


def add_export_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a model for other tools (Hugging Face transformers, llama.cpp)",
        description="Write a model in another library's format.",
    )
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    hf = formats.add_parser(
        "hf",
        help="a transformers GPT2LMHeadModel directory with tokenizer and chat template (a "
        "reward model from `minigpt rm`: a GPT2ForSequenceClassification)",
    )
    hf.add_argument("checkpoint", metavar="CKPT", help="run or checkpoint directory")
    hf.add_argument("out_dir", metavar="OUT_DIR", help="directory to write")
    hf.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    hf.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    hf.set_defaults(handler=run_export_hf)
    gguf = formats.add_parser(
        "gguf",
        help="one GGUF file for llama.cpp, llama-server, Ollama, LM Studio (tokenizer included)",
        description="Write a model as a GGUF file that llama.cpp runs as minigpt does. A chat "
        "model (one fine-tuned by `minigpt sft`) also gets the chat template and stops replies "
        "at <|END|>.",
    )
    gguf.add_argument("checkpoint", metavar="MODEL", help="run, checkpoint or HF GPT-2 directory")
    gguf.add_argument("out", metavar="OUT.gguf", help="file to write")
    gguf.add_argument(
        "--dtype",
        choices=["f32", "f16", "q8_0"],
        default="f32",
        help="matrix weights: f32 (lossless), f16 (half the size), q8_0 (8-bit, a quarter); "
        "norms, biases and positions stay f32 (default f32)",
    )
    gguf.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the chat template and <|END|> as end of turn (default: yes for runs "
        "made by `minigpt sft`, no otherwise)",
    )
    gguf.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if it exists")
    gguf.set_defaults(handler=run_export_gguf)


def run_export_hf(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from minigpt.checkpoints import load_model
    from minigpt.interop.hf import HFError, export_hf

    out_dir = Path(args.out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        raise HFError(f"{out_dir} is not empty; pass --overwrite to write into it")
    model = load_model(args.checkpoint, head=None)  # a language or a reward model
    files = export_hf(model, out_dir, dtype=getattr(torch, args.dtype))
    print(f"wrote {len(files)} files to {out_dir}: {', '.join(f.name for f in files)}")
    return 0


def run_export_gguf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from minigpt.errors import MinigptError

    try:
        from minigpt.interop.gguf import GGUFError, export_gguf
    except ModuleNotFoundError as e:
        raise MinigptError(f"{e.name} is not installed: pip install 'minigpt[gguf]'") from e
    from minigpt.checkpoints import chat_tuned, load_model

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise GGUFError(f"{out} exists; pass --overwrite to replace it")
    chat = bool(chat_tuned(args.checkpoint)) if args.chat is None else args.chat
    model = load_model(args.checkpoint)
    export_gguf(model, out, file_type=args.dtype, chat=chat, overwrite=args.overwrite)
    kind = "chat model" if chat else "base model (no chat template)"
    print(f"wrote {out} ({args.dtype}, {kind}, {out.stat().st_size / 2**20:.1f} MiB)")
    return 0
