"""Flags and helpers that several verbs share: counts, run directories, model loading, sampling."""

from __future__ import annotations

import argparse


def parse_count(text: str) -> int:
    """Token counts with an optional suffix: 100M, 10k, 2G, 1e8."""
    scale = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}
    try:
        if text and text[-1] in scale:
            return int(float(text[:-1]) * scale[text[-1]])
        return int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 100M, 65536)") from None


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--out and --resume: where a training run lives and what it continues from."""
    parser.add_argument("--out", default=None, help="run directory (default runs/<config>-<time>)")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="latest|PATH",
        help="continue a run: 'latest' (its newest complete checkpoint; needs --out), "
        "a run directory, or a checkpoint directory",
    )


def run_paths(args: argparse.Namespace):
    """(checkpoint or run to resume from, or None; the run directory) from --out / --resume."""
    from minigpt.checkpoints import default_run_dir, resume_source

    if args.resume is not None:
        return resume_source(args.resume, args.out)
    return None, args.out or default_run_dir(args.config)


def add_model_arguments(parser: argparse.ArgumentParser, dtype: str = "float32") -> None:
    """--model, --device, --dtype, --quantize, --verify: what every verb that loads a model
    takes."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="M",
        help="a run directory, a checkpoint directory, or a Hugging Face GPT-2 directory",
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda if available)"
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default=dtype,
        help=f"weights (and KV cache) dtype; auto = bfloat16 on GPUs with native bf16, "
        f"float16 on older GPUs, float32 on the CPU (default {dtype})",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8: every Linear layer and the output head as int8 weights (CPU only; "
        "approximate: greedy tokens mostly those of float32; ~2x faster batch-1 decoding)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check every byte of the checkpoint against its recorded sha256 (file sizes are "
        "always checked); a run directory falls back past a damaged checkpoint either way",
    )


def check_model_args(args: argparse.Namespace):
    """The device and dtype `--device`, `--dtype` and `--quantize` ask for, once `--model` is
    known to name a model: every user mistake in them as one MinigptError, before anything is
    loaded or touches CUDA (so `serve` can refuse them before it starts listening)."""
    from minigpt.checkpoints import resolve_checkpoint
    from minigpt.device import resolve_device, resolve_dtype
    from minigpt.interop.hf import is_hf_directory

    quantize = getattr(args, "quantize", None)
    asked = "cpu" if quantize and args.device == "auto" else args.device  # int8 kernels: CPUs
    if quantize:  # first: an int8 request for a GPU is refused as such, not for lack of CUDA
        from minigpt.device import DTYPES
        from minigpt.quantize import check_quantize

        check_quantize(quantize, asked, DTYPES.get(args.dtype))
    device = resolve_device(asked, key="--device")
    dtype = resolve_dtype(args.dtype, device, key="--dtype")
    if not is_hf_directory(args.model):
        resolve_checkpoint(args.model)  # a missing path or a folder with no model says so
    return device, dtype


def load_model_from_args(args: argparse.Namespace):
    """`--model M` as an eval-mode GPT on the chosen device, and that device. The one place that
    turns a run, checkpoint or Hugging Face GPT-2 directory into a model for the CLI."""
    from minigpt.checkpoints import load_model

    device, dtype = check_model_args(args)
    model = load_model(args.model, device=device, dtype=dtype, verify=args.verify)
    if getattr(args, "quantize", None):
        from minigpt.quantize import quantize_int8

        return quantize_int8(model), device
    return model.eval(), device


def warn_if_base_model(verb: str, path: str) -> bool | None:
    """Say once, on stderr, when `path` is a base (pre-trained) run, which rambles in a chat;
    returns what `chat_tuned` knows (None: nothing says either way, and nothing is printed)."""
    import sys

    from minigpt.checkpoints import chat_tuned

    chat = chat_tuned(path)
    if chat is False:
        print(
            f"minigpt {verb}: {path} is a base (pre-trained) model, not fine-tuned for chat: "
            "replies will ramble; fine-tune with minigpt sft",
            file=sys.stderr,
            flush=True,
        )
    return chat


def add_inference_args(parser: argparse.ArgumentParser, temperature: float, top_k: int | None):
    """Flags shared by the verbs that sample from a model."""
    add_model_arguments(parser, dtype="auto")
    parser.add_argument(
        "--temperature",
        type=float,
        default=temperature,
        help=f"sampling temperature; 0 = greedy (default {temperature})",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=top_k,
        help=f"sample among the k most likely tokens; 0 = all (default {top_k or 0})",
    )
    parser.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling: keep probability mass p"
    )
    parser.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    parser.add_argument(
        "--no-kv-cache",
        dest="kv_cache",
        action="store_false",
        help="re-run the whole sequence every step (same sampling, slower; for comparison)",
    )


def add_prefix_cache_argument(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument(
        "--kv-cache-mb",
        type=float,
        default=default,
        metavar="MB",
        help="memory for the keys and values of earlier sequences, reused by prompts that start "
        f"the same way (a system prompt, earlier turns) instead of prefilling them again; "
        f"least recently used evicted; 0 = off ({default})",
    )


def check_prefix_cache(args: argparse.Namespace) -> None:
    from minigpt.errors import MinigptError

    if not args.kv_cache_mb >= 0:
        raise MinigptError("--kv-cache-mb must be >= 0 (0 turns prefix caching off)")


def load_inference_model(args: argparse.Namespace):
    """The model for sampling, and the number of token ids its tokenizer can decode. A float
    model on an x86-64 CPU comes with its Linear layers prepacked for oneDNN (the same numbers,
    1.5-2.4x the decode speed: minigpt.quantize.pack_for_cpu)."""
    from minigpt.quantize import pack_for_cpu, packing_pays
    from minigpt.tokenizer import get_tokenizer

    model, _ = load_model_from_args(args)
    if packing_pays(model):
        model = pack_for_cpu(model)
    return model, get_tokenizer().n_vocab


def sampling_from_args(args: argparse.Namespace):
    from minigpt.engine import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
