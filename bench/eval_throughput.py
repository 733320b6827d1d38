"""Benchmark scoring examples/s: the batched core against one example at a time, and the time
of a whole suite run.

Part 1 scores the same examples of a few tasks with the same model (random weights, `gpt2` shape
by default) both ways, in alternating rounds so that load from other processes hits both alike:
the reference is one forward per choice (`context + continuation` alone, full-vocabulary logits),
as a plain evaluation loop does. Predictions must agree; the script says so.
Part 2 (--suite-model) times `run_suite` over every task on a trained checkpoint.

    python bench/eval_throughput.py --limit 48 --out bench/results/eval_throughput-cpu.json
    python bench/eval_throughput.py --suite-model runs/demo/pretrain --skip-core
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a plain checkout

from minigpt.evals import multiple_choice  # noqa: E402
from minigpt.evals.tasks import get_task  # noqa: E402
from minigpt.model import GPT, GPT2_VOCAB_SIZE, GPTConfig  # noqa: E402
from minigpt.tokenizer import get_tokenizer  # noqa: E402


@torch.no_grad()
def one_at_a_time(model: GPT, examples) -> list[int]:
    """acc predictions, one forward per choice."""
    tokenizer, block, out = get_tokenizer(), model.config.block_size, []
    for example in examples:
        logprobs = []
        for context, continuation in zip(example.contexts, example.continuations, strict=True):
            ctx, cont = multiple_choice.encode_pair(tokenizer, context, continuation)
            choice = multiple_choice.to_choice(ctx, cont, block)
            tokens = torch.tensor([choice.tokens])
            logits = model(tokens[:, :-1])[0][0, :, :GPT2_VOCAB_SIZE].float()
            logp = torch.log_softmax(logits, dim=-1)
            picked = logp[torch.arange(tokens.size(1) - 1), tokens[0, 1:]]
            logprobs.append(picked[-choice.n_scored :].sum().item())
        out.append(max(range(len(logprobs)), key=logprobs.__getitem__))
    return out


def core_speed(args) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.preset)).eval()
    examples = []
    for name in args.tasks.split(","):
        examples += get_task(name).load(data_dir=args.data_dir, limit=args.limit).examples
    times = {"one_at_a_time": 0.0, "batched": 0.0}
    agree = 0
    for start in range(0, len(examples), args.round):
        chunk = examples[start : start + args.round]
        t0 = time.perf_counter()
        reference = one_at_a_time(model, chunk)
        t1 = time.perf_counter()
        batched = multiple_choice.predict(model, chunk, "cpu", args.batch_size)
        times["one_at_a_time"] += t1 - t0
        times["batched"] += time.perf_counter() - t1
        agree += sum(r == p.pred for r, p in zip(reference, batched, strict=True))
    rates = {k: len(examples) / v for k, v in times.items()}
    return {
        "examples": len(examples),
        "tasks": args.tasks,
        "preset": args.preset,
        "batch_size": args.batch_size,
        "one_at_a_time_examples_per_sec": round(rates["one_at_a_time"], 2),
        "batched_examples_per_sec": round(rates["batched"], 2),
        "speedup": round(rates["batched"] / rates["one_at_a_time"], 2),
        "predictions_agree": f"{agree}/{len(examples)}",
    }


def suite_time(args) -> dict:
    from minigpt.checkpoints import load_model
    from minigpt.evals.suite import markdown_table, run_suite
    from minigpt.evals.tasks import TASKS

    model = load_model(args.suite_model).eval()
    start = time.perf_counter()
    result = run_suite(model, list(TASKS), "cpu", args.batch_size, None, args.data_dir, False)
    seconds = time.perf_counter() - start
    print(markdown_table(result))
    return {
        "suite_model": str(args.suite_model),
        "suite_seconds": round(seconds, 1),
        "suite_examples": sum(r["n"] for r in result["tasks"].values()),
        "suite_core": round(result["core"], 4),
        "per_task_seconds": {k: round(r["seconds"], 1) for k, r in result["tasks"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="hellaswag,arc_easy,winogrande")
    parser.add_argument("--limit", type=int, default=48, help="examples per task")
    parser.add_argument("--round", type=int, default=24, help="examples per alternating round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--preset", default="gpt2", help="model shape (random weights)")
    parser.add_argument("--data-dir", default=None, help="the offline copy (make eval-data)")
    parser.add_argument("--suite-model", default=None, help="also time the whole suite on it")
    parser.add_argument("--skip-core", action="store_true", help="only the suite timing")
    parser.add_argument("--out", default=None, help="write the measurement as JSON here")
    args = parser.parse_args()
    result = {} if args.skip_core else core_speed(args)
    if args.suite_model:
        result.update(suite_time(args))
    result.update(
        device="cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        machine=platform.processor() or platform.machine(),
        date=time.strftime("%Y-%m-%d"),
        command=" ".join(sys.argv),
    )
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
