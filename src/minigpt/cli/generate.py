"""`minigpt generate` and `minigpt chat`: sampling from a model."""

from __future__ import annotations

import argparse
import sys

from minigpt.cli.common import (
    add_inference_args,
    add_prefix_cache_argument,
    check_prefix_cache,
    load_inference_model,
    sampling_from_args,
)
from minigpt.errors import MinigptError


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
    parser.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="samples per prompt (default 5; 1 with --temperature 0, since greedy samples are "
        "identical)",
    )
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
    add_prefix_cache_argument(parser, default=256)
    parser.set_defaults(handler=run_chat)


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
    if args.num_samples is None:  # greedy samples of one prompt are all the same: make one
        args.num_samples = 1 if args.temperature == 0 else 5
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
    from minigpt.cli.common import warn_if_base_model
    from minigpt.engine import Engine
    from minigpt.tokenizer import get_tokenizer

    check_prefix_cache(args)
    model, n_vocab = load_inference_model(args)
    warn_if_base_model("chat", args.model)
    # the history is sent again with every message: its keys and values are reused
    engine = Engine(model, n_vocab, use_kv_cache=args.kv_cache, prefix_cache_mb=args.kv_cache_mb)
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
