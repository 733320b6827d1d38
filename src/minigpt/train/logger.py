"""What a run records: `metrics.jsonl`, `log.txt`, and TensorBoard under `tb/`.

`metrics.jsonl` has one JSON object per event, always with `"step"` (optimizer steps completed):
training lines carry `train_loss`, `lr`, `grad_norm`, `tokens_per_sec` (and `mfu` on known GPUs);
evaluation lines carry `val_loss`, hook metrics such as `hellaswag_acc_norm`, and `samples`.
`log.txt` keeps the seeds' plain format (`{step} train {loss:.6f}`, `{step} val {loss:.4f}`,
`{step} hella {acc_norm:.4f}`; DPO adds `{step} reward_acc {held-out accuracy:.4f}`). Only the
process with `enabled=True` (rank 0) writes anything.

Resuming from the checkpoint of step S first drops every record after S, so a run killed and
resumed reads exactly like one that never stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

METRICS = "metrics.jsonl"
LOG_TXT = "log.txt"
TENSORBOARD = "tb"
# metric -> (tag, format) of its log.txt line
LOG_TXT_LINES = {
    "train_loss": ("train", ".6f"),
    "val_loss": ("val", ".4f"),
    "hellaswag_acc_norm": ("hella", ".4f"),
    "eval_rewards/accuracies": ("reward_acc", ".4f"),  # DPO, held-out pairs
}


def _truncate_after(path: Path, step: int, step_of) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines(True) if step_of(line) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _open_tensorboard(directory: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(log_dir=str(directory), purge_step=purge_step)


class RunLogger:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            _truncate_after(self.run_dir / METRICS, resume_step, lambda s: json.loads(s)["step"])
            _truncate_after(self.run_dir / LOG_TXT, resume_step, lambda s: int(s.split()[0]))
        if tensorboard:
            purge = None if resume_step is None else resume_step + 1
            self.tb = _open_tensorboard(self.run_dir / TENSORBOARD, purge)
        self._metrics = open(self.run_dir / METRICS, "a")
        self._log_txt = open(self.run_dir / LOG_TXT, "a")

    def log(self, step: int, metrics: dict) -> None:
        """Record one event: numbers become scalars, strings / string lists become text."""
        if not self.enabled:
            return
        self._metrics.write(json.dumps({"step": step, **metrics}) + "\n")
        self._metrics.flush()
        for name, (tag, fmt) in LOG_TXT_LINES.items():
            if name in metrics:
                self._log_txt.write(f"{step} {tag} {metrics[name]:{fmt}}\n")
        self._log_txt.flush()
        if self.tb is not None:
            for name, value in metrics.items():
                if isinstance(value, int | float):
                    self.tb.add_scalar(name, value, step)
                elif isinstance(value, str | list):
                    text = value if isinstance(value, str) else "\n\n---\n\n".join(value)
                    self.tb.add_text(name, text, step)
            self.tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        self._log_txt.close()
        if self.tb is not None:
            self.tb.close()
