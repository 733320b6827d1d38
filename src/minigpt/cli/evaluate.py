"""`minigpt eval`: validation loss and benchmarks."""

from __future__ import annotations

import argparse

from minigpt.cli.common import add_model_arguments, load_model_from_args, parse_count


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
