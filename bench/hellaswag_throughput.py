"""HellaSwag examples/s: the batched evaluator against a one-example-at-a-time reference.

Both score the same examples with the same model (the `gpt2` preset shape, random weights by
default) in the same run. The reference is build-nanogpt's loop: one forward per example over its
four `context + ending` rows, full-vocabulary logits at every position. The two are timed in
alternating rounds of the same examples, so that load from other processes on a shared machine
hits both alike. Predictions must agree; the script says so.

    python bench/hellaswag_throughput.py --data PATH/TO/hellaswag.arrow --limit 128
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minigpt.evals.hellaswag import encode, load_examples, score_examples
from minigpt.model import GPT, GPT2_VOCAB_SIZE, GPTConfig
from minigpt.tokenizer import get_tokenizer


@torch.no_grad()
def reference_predictions(model: GPT, examples, device) -> list[tuple[int, int]]:
    """(acc, acc_norm) predictions, one forward of four padded rows per example."""
    tokenizer, out = get_tokenizer(), []
    for example in examples:
        choices = encode(example, tokenizer, model.config.block_size)
        width = max(len(choices.context) + len(e) for e in choices.endings)
        tokens = torch.zeros(len(choices.endings), width, dtype=torch.long)
        mask = torch.zeros(len(choices.endings), width)
        for i, ending in enumerate(choices.endings):
            row = choices.context + ending
            tokens[i, : len(row)] = torch.tensor(row)
            mask[i, len(choices.context) : len(row)] = 1
        tokens, mask = tokens.to(device), mask.to(device)
        logits = model(tokens)[0][..., :GPT2_VOCAB_SIZE].float()
        losses = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), reduction="none"
        ).view(tokens.size(0), -1)
        sum_loss = (losses * mask[:, 1:]).sum(1)
        mean_loss = sum_loss / mask[:, 1:].sum(1)
        out.append((int(sum_loss.argmin()), int(mean_loss.argmin())))
    return out


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="HellaSwag JSONL/Arrow (default: official)")
    parser.add_argument("--limit", type=int, default=128, help="examples to score")
    parser.add_argument("--round", type=int, default=32, help="examples per alternating round")
    parser.add_argument("--batch-size", type=int, default=16, help="batched evaluator's batch")
    parser.add_argument("--preset", default="gpt2", help="model shape (random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the measurement as JSON here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.preset)).to(args.device).eval()
    examples = load_examples(args.data, limit=args.limit)
    times = {"reference": 0.0, "batched": 0.0}
    agree = 0
    for start in range(0, len(examples), args.round):
        chunk = examples[start : start + args.round]
        t0 = time.perf_counter()
        reference = reference_predictions(model, chunk, args.device)
        synchronize(args.device)
        t1 = time.perf_counter()
        batched = score_examples(model, chunk, args.device, args.batch_size)
        synchronize(args.device)
        times["reference"] += t1 - t0
        times["batched"] += time.perf_counter() - t1
        agree += sum(r == (p.pred, p.pred_norm) for r, p in zip(reference, batched, strict=True))
    rates = {k: len(examples) / v for k, v in times.items()}
    result = {
        "examples": len(examples),
        "preset": args.preset,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "reference_examples_per_sec": round(rates["reference"], 2),
        "batched_examples_per_sec": round(rates["batched"], 2),
        "speedup": round(rates["batched"] / rates["reference"], 2),
        "predictions_agree": f"{agree}/{len(examples)}",
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
