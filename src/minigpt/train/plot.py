"""`minigpt plot`: loss curves (and HellaSwag when logged) of one or more runs in one PNG."""

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


def plot_runs(run_dirs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Train and val loss per run (one colour per run) and, if any run logged it, HellaSwag
    acc_norm in a second panel. Writes a PNG to `out`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    runs = {Path(d).name or str(d): read_metrics(d) for d in run_dirs}
    has_hella = any(series(r, "hellaswag_acc_norm")[0] for r in runs.values())
    fig, axes = plt.subplots(1, 2 if has_hella else 1, figsize=(12 if has_hella else 7, 4.5))
    loss_ax = axes[0] if has_hella else axes
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        loss_ax.plot(
            *series(records, "train_loss"), color=color, alpha=0.35, lw=1, label=f"{name} train"
        )
        loss_ax.plot(
            *series(records, "val_loss"), color=color, lw=2, marker=".", label=f"{name} val"
        )
        if has_hella:
            axes[1].plot(*series(records, "hellaswag_acc_norm"), color=color, label=name)
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend(fontsize="small")
    if has_hella:
        axes[1].set(xlabel="step", ylabel="acc_norm", title="HellaSwag")
        axes[1].legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
