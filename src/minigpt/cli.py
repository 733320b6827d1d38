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
    from minigpt.train.pretrain import default_run_dir, resume_source

    if args.resume is not None:
        return resume_source(args.resume, args.out)
    return None, args.out or default_run_dir(args.config)


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


# -------------------------------------------------------------------------------------------- sft
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


def run_sft(args: argparse.Namespace) -> int:
    from pathlib import Path

    from minigpt.config import load_config, parse_override_args

    config = load_config(args.config, parse_override_args(args.overrides))  # fail before torch
    if args.init is not None and not Path(args.init).exists():
        raise MinigptError(f"--init {args.init}: no such run, checkpoint or model directory")
    if args.init is None and args.resume is None:
        raise MinigptError("--init MODEL is required (a run, checkpoint or HF GPT-2 directory)")
    from minigpt.train.sft import sft

    resume_from, run_dir = run_paths(args)
    sft(config, run_dir, resume_from, args.init)
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


# ------------------------------------------------------------------------------------------- eval
def add_model_arguments(parser: argparse.ArgumentParser, dtype: str = "float32") -> None:
    """--model, --device, --dtype: what every verb that loads a model takes."""
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
        help=f"weights (and KV cache) dtype; auto = bfloat16 on cuda, float32 elsewhere "
        f"(default {dtype})",
    )


def load_model_from_args(args: argparse.Namespace):
    """`--model M` as an eval-mode GPT on the chosen device, and that device. The one place that
    turns a run, checkpoint or Hugging Face GPT-2 directory into a model for the CLI."""
    import torch

    from minigpt.checkpoint import load_model

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return load_model(args.model, device=device, dtype=getattr(torch, dtype)).eval(), device


def add_eval_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="measure a model: validation loss, HellaSwag",
        description="Measure a model on a dataset's validation split or on HellaSwag.",
    )
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")

    loss = tasks.add_parser("loss", help="mean loss and perplexity on a val split")
    add_model_arguments(loss)
    loss.add_argument("--data", required=True, help="token shard directory (minigpt prepare)")
    loss.add_argument(
        "--tokens",
        type=parse_count,
        default=2**20,
        help="token budget, rounded down to whole sequences (default 1048576)",
    )
    loss.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    loss.set_defaults(handler=run_eval_loss)

    hella = tasks.add_parser("hellaswag", help="HellaSwag validation accuracy")
    add_model_arguments(hella)
    hella.add_argument(
        "--data",
        default=None,
        help="a HellaSwag JSONL/Arrow file or directory, a URL, or Rowan/hellaswag for the hub "
        "(default: the official hellaswag_val.jsonl, downloaded once)",
    )
    hella.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    hella.add_argument("--batch-size", type=int, default=16, help="examples per forward")
    hella.add_argument("--output", default=None, help="write per-example predictions (JSONL)")
    hella.set_defaults(handler=run_eval_hellaswag)


def run_eval_loss(args: argparse.Namespace) -> int:
    from minigpt.evals.loss import evaluate_loss

    model, device = load_model_from_args(args)
    result = evaluate_loss(model, args.data, args.tokens, args.batch_size, device)
    print(
        f"val loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
        f"tokens {result['tokens']:,}"
    )
    return 0


def run_eval_hellaswag(args: argparse.Namespace) -> int:
    import json
    import time

    from minigpt.evals import hellaswag

    model, device = load_model_from_args(args)
    examples = hellaswag.load_examples(args.data, limit=args.limit)
    start = time.perf_counter()
    predictions = hellaswag.score_examples(model, examples, device, args.batch_size)
    result = hellaswag.summarize(hellaswag.tally(predictions), time.perf_counter() - start)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p.to_dict()) + "\n" for p in predictions)
    print(
        f"hellaswag acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}  "
        f"n {result['n']}  ({result['examples_per_sec']:.1f} examples/s)"
    )
    return 0


# ----------------------------------------------------------------------------------------- export
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
    from minigpt.hf import HFError, export_hf

    out_dir = Path(args.out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        raise HFError(f"{out_dir} is not empty; pass --overwrite to write into it")
    model = load_model(args.checkpoint)
    files = export_hf(model, out_dir, dtype=getattr(torch, args.dtype))
    print(f"wrote {len(files)} files to {out_dir}: {', '.join(f.name for f in files)}")
    return 0


# ------------------------------------------------------------------------------ generate and chat
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
        help=f"sample among the k most likely tokens (default {top_k or 'all'})",
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


def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="continue text prompts with a model",
        description="Sample continuations of prompts: all prompts and samples run as one batch.",
    )
    add_inference_args(parser, temperature=1.0, top_k=50)
    parser.add_argument(
        "--prompt", action="append", default=[], help="prompt text (repeat for several)"
    )
    parser.add_argument("--prompt-file", help="a file of prompts, one per line")
    parser.add_argument("--num-samples", type=int, default=5, help="samples per prompt (5)")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="tokens per sample (50)")
    parser.set_defaults(handler=run_generate)


def add_chat_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="talk to a fine-tuned model in the terminal",
        description="An interactive chat that streams each reply; /reset, /system TEXT, /exit.",
    )
    add_inference_args(parser, temperature=0.7, top_k=50)
    parser.add_argument("--system", default=None, help="system prompt to start with")
    parser.add_argument(
        "--max-new-tokens", type=int, default=256, help="longest reply in tokens (256)"
    )
    parser.set_defaults(handler=run_chat)


def load_inference_model(args: argparse.Namespace):
    """The model for sampling, and the number of token ids its tokenizer can decode."""
    from minigpt.tokenizer import get_tokenizer

    model, _ = load_model_from_args(args)
    return model, get_tokenizer().n_vocab


def sampling_from_args(args: argparse.Namespace):
    from minigpt.engine import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise MinigptError(f"{args.prompt_file}: cannot read prompts ({e.strerror})") from e
    if not prompts:
        raise MinigptError("no prompt: give --prompt TEXT or --prompt-file FILE")
    return prompts


def run_generate(args: argparse.Namespace) -> int:
    import time

    from minigpt.engine import Engine
    from minigpt.tokenizer import get_tokenizer

    prompts = read_prompts(args)
    tok = get_tokenizer()
    model, n_vocab = load_inference_model(args)
    engine = Engine(model, n_vocab, use_kv_cache=args.kv_cache)
    # an empty prompt starts from <|endoftext|>, as GPT-2 does for unconditional samples
    ids = [tok.encode(p) or [tok.eot_id] for p in prompts]
    start = time.perf_counter()
    outputs = engine.generate(
        ids,
        args.max_new_tokens,
        sampling_from_args(args),
        num_samples=args.num_samples,
        stop_ids={tok.eot_id},
        seed=args.seed,
    )
    elapsed = time.perf_counter() - start
    for seq, out in enumerate(outputs):
        prompt, sample = divmod(seq, args.num_samples)
        print(f"=== prompt {prompt + 1}, sample {sample + 1} ===")
        print(prompts[prompt] + tok.decode([t for t in out if t != tok.eot_id]))
    n_tokens = sum(map(len, outputs))
    print(
        f"{n_tokens} tokens in {elapsed:.2f}s ({n_tokens / elapsed:.1f} tokens/s)", file=sys.stderr
    )
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from minigpt.chat import ChatSession, run_repl
    from minigpt.engine import Engine
    from minigpt.tokenizer import get_tokenizer

    model, n_vocab = load_inference_model(args)
    engine = Engine(model, n_vocab, use_kv_cache=args.kv_cache)
    session = ChatSession(
        engine, get_tokenizer(), sampling_from_args(args), args.max_new_tokens, args.seed
    )
    if args.system:
        session.set_system(args.system)
    print(
        f"minigpt chat: {args.model} ({model.num_params() / 1e6:.1f}M parameters, "
        f"context {model.config.block_size} tokens)"
    )
    run_repl(session)
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
    add_sft_parser(subparsers)
    add_plot_parser(subparsers)
    add_eval_parser(subparsers)
    add_export_parser(subparsers)
    add_generate_parser(subparsers)
    add_chat_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `train` and `sft` pass dotted --section.key overrides through to the config loader
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
