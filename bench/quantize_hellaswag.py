"""HellaSwag with int8 weights against float32 on the same rows: accuracy change and agreement.

    python bench/quantize_hellaswag.py --data HELLASWAG_FILE [--model M] [--limit 128]

Scores the first --limit rows with the float32 model and with `minigpt.quantize.quantize_int8`
of it (what `minigpt eval hellaswag --quantize int8` runs), and prints acc / acc_norm of each,
the change, the fraction of rows where both pick the same ending, and examples/s of each.
Without --model the weights are random (GPT-2 124M shape): endings then differ by tiny margins,
which is the hardest case for agreement, and accuracy sits near chance (25%).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from minigpt.evals import hellaswag
from minigpt.model import GPT, GPTConfig
from minigpt.quantize import quantize_int8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="HellaSwag JSONL or Arrow file")
    parser.add_argument("--model", help="run, checkpoint or HF directory (default: random)")
    parser.add_argument("--limit", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args()
    if args.model:
        from minigpt.checkpoints import load_model

        model = load_model(args.model).eval()
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_preset("gpt2")).eval()
    examples = hellaswag.load_examples(args.data, limit=args.limit)
    models = {"float32": model, "int8": quantize_int8(copy.deepcopy(model))}
    preds, tallies, rates = {}, {}, {}
    for name, m in models.items():
        start = time.perf_counter()
        preds[name] = hellaswag.score_examples(m, examples, "cpu", args.batch_size)
        seconds = time.perf_counter() - start
        tallies[name] = hellaswag.summarize(hellaswag.tally(preds[name]), seconds)
        rates[name] = tallies[name]["examples_per_sec"]
    pairs = list(zip(preds["float32"], preds["int8"], strict=True))
    same = sum(a.pred == b.pred for a, b in pairs) / len(pairs)
    same_norm = sum(a.pred_norm == b.pred_norm for a, b in pairs) / len(pairs)
    print(f"HellaSwag, first {len(examples)} rows; {args.model or 'random GPT-2 124M weights'}")
    for name in models:
        t = tallies[name]
        print(
            f"{name:8} acc {t['acc']:.4f}  acc_norm {t['acc_norm']:.4f}  "
            f"{rates[name]:.2f} examples/s"
        )
    d_acc = tallies["int8"]["acc"] - tallies["float32"]["acc"]
    d_norm = tallies["int8"]["acc_norm"] - tallies["float32"]["acc_norm"]
    print(f"change   acc {d_acc:+.4f}  acc_norm {d_norm:+.4f}")
    print(f"same ending chosen: acc {same:.3f}, acc_norm {same_norm:.3f} of rows")
    if args.out:
        record = {
            "data": str(args.data),
            "rows": len(examples),
            "model": args.model or "random GPT-2 124M weights (seed 0)",
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "command": f"python bench/quantize_hellaswag.py --limit {args.limit}",
            "float32": tallies["float32"],
            "int8": tallies["int8"],
            "examples_per_sec": rates,
            "agreement": {"acc": same, "acc_norm": same_norm},
        }
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
