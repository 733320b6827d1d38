"""`minigpt plot`: loss curves (and benchmark scores, DPO rewards, reward-model accuracy, RL reward
and KL when logged) of runs in one PNG."""

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


def run_labels(run_dirs: list[str | os.PathLike]) -> list[str]:
    """A label per run: its folder's name, or as many trailing folders as tell it apart from the
    others (`A/pretrain`, `B/pretrain`); the same folder given twice gets `(2)`, `(3)`..."""
    paths = [Path(os.path.abspath(d)).parts[1:] or ("/",) for d in run_dirs]
    unique = list(dict.fromkeys(paths))
    depth = dict.fromkeys(unique, 1)
    while True:
        label = {p: "/".join(p[-depth[p] :]) for p in unique}
        names = list(label.values())
        grow = [p for p in unique if names.count(label[p]) > 1 and depth[p] < len(p)]
        if not grow:
            break
        for p in grow:
            depth[p] += 1
    labels, seen = [], {}
    for p in paths:
        seen[p] = seen.get(p, 0) + 1
        labels.append(label[p] if seen[p] == 1 else f"{label[p]} ({seen[p]})")
    return labels


# (title, y label, training metric drawn thin or None, evaluation metric drawn bold); the
# benchmarks panel draws every score a run logged (score_names) instead of one metric
BENCHMARKS = "benchmarks"
PANELS = [
    ("loss", "loss", "train_loss", "val_loss"),
    (BENCHMARKS, "acc_norm / centred mean", None, None),
    ("DPO reward accuracy", "rewards/accuracies", "rewards/accuracies", "eval_rewards/accuracies"),
    ("DPO reward margin", "rewards/margins", "rewards/margins", "eval_rewards/margins"),
    ("reward model accuracy", "accuracy", "accuracy", "eval_accuracy"),
    ("RL reward", "reward", "reward", None),
    ("RL KL to the start", "kl", "kl", None),
]


def panels(runs: dict[str, list[dict]]) -> list[tuple]:
    """The PANELS that some run logged (the loss panel always)."""

    def logged(panel: tuple) -> bool:
        if panel[0] == BENCHMARKS:
            return any(score_names(r) for r in runs.values())
        return any(series(r, m)[0] for r in runs.values() for m in panel[2:] if m is not None)

    return [panel for i, panel in enumerate(PANELS) if i == 0 or logged(panel)]


def _plot_scores(ax, runs: dict[str, list[dict]]) -> None:
    styles = ["-", "--", ":", "-."]
    for i, (name, records) in enumerate(runs.items()):
        for j, metric in enumerate(score_names(records)):
            label = metric.removesuffix("_acc_norm")
            ax.plot(
                *series(records, metric),
                color=f"C{i}",
                ls=styles[j % len(styles)],
                marker="o" if metric == "tasks_core" else ".",
                label=f"{name} {label}" if len(runs) > 1 else label,
            )


def plot_runs(run_dirs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """One panel per logged quantity (loss; benchmark scores: HellaSwag, the eval.tasks and their
    CORE mean; DPO reward accuracy and margin; reward-model accuracy; RL reward and KL), one
    colour per run: training values thin,
    evaluations bold. Writes a PNG to `out`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    runs = {label: read_metrics(d) for label, d in zip(run_labels(run_dirs), run_dirs, strict=True)}
    shown = panels(runs)
    fig, axes = plt.subplots(1, len(shown), figsize=(1 + 6 * len(shown), 4.5), squeeze=False)
    for ax, (title, ylabel, train_key, eval_key) in zip(axes[0], shown, strict=True):
        if title == BENCHMARKS:
            _plot_scores(ax, runs)
        for i, (name, records) in enumerate(runs.items()):
            color = f"C{i}"
            if train_key is not None:
                ax.plot(
                    *series(records, train_key),
                    color=color,
                    alpha=0.35,
                    lw=1,
                    label=f"{name} train",
                )
            if eval_key is not None:
                label = f"{name} val" if train_key is not None else name
                ax.plot(*series(records, eval_key), color=color, lw=2, marker=".", label=label)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
