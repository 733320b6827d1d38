"""`minigpt plot`: loss curves (and benchmark scores when logged) of one or more runs in one PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path

from minigpt.errors import MinigptError
from minigpt.train.logger import METRICS


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise MinigptError(f"{run_dir}: no {METRICS}; is this a minigpt run directory?")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise MinigptError(f"{path}: not JSON lines ({e})") from e


def series(records: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), int | float)]
    return [s for s, _ in points], [v for _, v in points]


def score_names(records: list[dict]) -> list[str]:
    """Benchmark scores a run logged: each task's acc_norm (HellaSwag's too) and the CORE mean."""
    names = {k for r in records for k in r if k.endswith("_acc_norm") or k == "tasks_core"}
    return sorted(names)


def plot_runs(run_dirs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Train and val loss per run (one colour per run) and, if any run logged them, benchmark
    scores (HellaSwag, the eval.tasks, their CORE mean) in a second panel. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    runs = {Path(d).name or str(d): read_metrics(d) for d in run_dirs}
    scores = {name: score_names(records) for name, records in runs.items()}
    has_scores = any(scores.values())
    fig, axes = plt.subplots(1, 2 if has_scores else 1, figsize=(12 if has_scores else 7, 4.5))
    loss_ax = axes[0] if has_scores else axes
    styles = ["-", "--", ":", "-."]
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        loss_ax.plot(
            *series(records, "train_loss"), color=color, alpha=0.35, lw=1, label=f"{name} train"
        )
        loss_ax.plot(
            *series(records, "val_loss"), color=color, lw=2, marker=".", label=f"{name} val"
        )
        for j, metric in enumerate(scores[name]):
            label = metric.removesuffix("_acc_norm")
            axes[1].plot(
                *series(records, metric),
                color=color,
                ls=styles[j % len(styles)],
                marker="o" if metric == "tasks_core" else ".",
                label=f"{name} {label}" if len(runs) > 1 else label,
            )
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend(fontsize="small")
    if has_scores:
        axes[1].set(xlabel="step", ylabel="acc_norm / centred mean", title="benchmarks")
        axes[1].legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
