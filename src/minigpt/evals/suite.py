"""Run several tasks on one loaded model; one table, one JSON, a CORE-style mean; compare runs.

Each task reports acc, acc_norm, acc_per_token (see `multiple_choice`), the expected accuracy of a
random guess, and its headline metric centred on that baseline: (metric - random) / (1 - random),
0 for chance and 1 for perfect, as nanochat's CORE score does. The suite's `core` is the mean of
the centred scores of the tasks run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from minigpt.errors import MinigptError
from minigpt.evals import multiple_choice
from minigpt.evals.tasks import get_task

METRICS = ("acc", "acc_norm", "acc_per_token")


def centered(score: float, random: float) -> float:
    return (score - random) / (1 - random)


def percent(value: float) -> str:
    """A fraction as a percentage with one decimal, never "-0.0"."""
    return f"{round(100 * value, 1) + 0.0:.1f}"


def run_suite(
    model: torch.nn.Module,
    names: Sequence[str],
    device: str | torch.device,
    batch_size: int = 16,
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    sources: dict[str, str] | None = None,
) -> dict:
    """{"tasks": {name: result}, "core": mean centred score, "limit": limit}; data for every task
    loads first, so a missing dataset fails before any scoring."""
    loaded = {
        name: get_task(name).load((sources or {}).get(name), data_dir, limit) for name in names
    }
    total = sum(len(x.examples) for x in loaded.values())
    results = {}
    with tqdm(total=total, unit="ex", disable=not progress, dynamic_ncols=True) as bar:
        for name, data in loaded.items():
            task = get_task(name)
            bar.set_description(name)
            start = time.perf_counter()
            predictions = multiple_choice.predict(
                model, data.examples, device, batch_size, progress=bar.update
            )
            seconds = time.perf_counter() - start
            summary = multiple_choice.summarize(
                multiple_choice.tally(predictions, data.examples), seconds
            )
            results[name] = {
                "title": task.title,
                **summary,
                "primary": task.primary,
                "centered": centered(summary[task.primary], summary["random"]),
                "seconds": seconds,
                "skipped": data.skipped,
                "problem": data.problem,
                "source": data.source,
            }
    return {
        "tasks": results,
        "core": sum(r["centered"] for r in results.values()) / len(results),
        "limit": limit,
    }


def markdown_table(result: dict) -> str:
    """One row per task and a CORE row; the headline metric of each task in bold."""
    lines = [
        "| task | n | acc | acc_norm | acc_per_token | random | centred |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["tasks"].values():
        cells = [f"**{percent(r[m])}**" if m == r["primary"] else percent(r[m]) for m in METRICS]
        lines.append(
            f"| {r['title']} | {r['n']} | {' | '.join(cells)} | {percent(r['random'])} | "
            f"{percent(r['centered'])} |"
        )
    lines.append(f"| **CORE** (mean centred) | | | | | | **{percent(result['core'])}** |")
    skipped = [f"{r['title']}: {r['skipped']}" for r in result["tasks"].values() if r["skipped"]]
    if skipped:
        lines.append(f"\nmalformed rows skipped: {', '.join(skipped)}")
    return "\n".join(lines)


def compare_table(results: dict[str, dict]) -> str:
    """Several suite results side by side: each task's headline metric, the CORE mean."""
    labels = list(results)
    names = list(dict.fromkeys(n for r in results.values() for n in r["tasks"]))
    lines = [
        "| task | metric | " + " | ".join(labels) + " |",
        "|---|---|" + "---:|" * len(labels),
    ]
    for name in names:
        entries = [r["tasks"].get(name) for r in results.values()]
        first = next(e for e in entries if e)
        cells = [percent(e[first["primary"]]) if e else "-" for e in entries]
        lines.append(f"| {first['title']} | {first['primary']} | " + " | ".join(cells) + " |")
    cores = [f"**{percent(r['core'])}**" for r in results.values()]
    lines.append("| **CORE** | centred | " + " | ".join(cores) + " |")
    return "\n".join(lines)


def read_results(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MinigptError(f"{path}: no such results file") from None
    except json.JSONDecodeError as e:
        raise MinigptError(f"{path}: not JSON ({e})") from e
    if not isinstance(data, dict) or "tasks" not in data or "core" not in data:
        raise MinigptError(f"{path}: not a `minigpt eval suite --output` results file")
    return data
