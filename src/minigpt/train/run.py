"""The life of one training run, whatever the stage: pre-training, SFT, DPO and what comes next.

A stage module brings a `setup(dist) -> StageParts` callback (its model, batches, validation data,
eval hooks and objective, built once the process group exists) and `run_training` does the rest:
it refuses to overwrite a run, joins the process group, resumes, records the resolved config,
trains and cleans up. Stages import this module, `finetune` and `trainer`, never each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from minigpt import checkpoints
from minigpt.config import RunConfig, dump_config
from minigpt.device import resolve_dtype
from minigpt.errors import MinigptError
from minigpt.model import GPT
from minigpt.train.distributed import (
    DistContext,
    broadcast_object,
    init_distributed,
    shutdown_distributed,
)
from minigpt.train.logger import METRICS
from minigpt.train.parallel import check_parallel
from minigpt.train.trainer import BatchSource, EvalData, EvalHook, Objective, Trainer


@dataclass
class StageParts:
    """What a stage plugs into the Trainer: objective None is the language-model loss."""

    model: GPT
    batches: BatchSource
    val_data: EvalData | None = None
    hooks: Sequence[EvalHook] = ()
    objective: Objective | None = None


def _announce(trainer: Trainer, config: RunConfig, run_dir: Path) -> None:
    model, cfg = trainer.model, config.train
    print(
        f"run {run_dir}: {model.num_params() / 1e6:.2f}M parameters, {trainer.dist.world_size} "
        f"process(es){' sharded (fsdp)' if trainer.sharded else ''} on {trainer.device} in {str(trainer.dtype).removeprefix('torch.')}, "
        f"{cfg.total_batch_tokens:,} tokens/step = {trainer.accum} x {cfg.micro_batch} x "
        f"{cfg.sequence_length} x {trainer.dist.world_size}, steps {trainer.step}->{cfg.max_steps}",
        flush=True,
    )


def run_training(
    config: RunConfig,
    run_dir: str | Path,
    resume_from: str | Path | None,
    dist: DistContext | None,
    setup: Callable[[DistContext], StageParts],
    notes: dict[str, str] | None = None,
) -> Path:
    """Refuse to overwrite a run, join the process group, build the stage's parts with
    `setup(dist)`, resume, record the resolved config (and on a fresh start `notes`, file name ->
    text) on rank 0, train, clean up. Returns the run directory.

    Resuming a run directory into itself when it has no checkpoint yet (a first start, or a
    crash before the first checkpoint) starts from scratch, so one command line with
    `--resume latest` serves first starts, torchrun restarts and requeued jobs alike."""
    run_dir = Path(run_dir)
    start_over = (
        resume_from is not None
        and Path(resume_from) == run_dir
        and not checkpoints.has_checkpoint(run_dir)
    )
    if start_over:
        resume_from = None
    elif resume_from is None and (run_dir / METRICS).exists():
        raise MinigptError(
            f"{run_dir} already holds a run; continue it with --resume latest, or pick a new --out"
        )
    own_dist = dist is None
    dist = dist or init_distributed(config.train.device, config.train.dist_timeout_minutes)
    try:
        run_dir = Path(broadcast_object(str(run_dir), dist))
        train = config.train  # an impossible parallel setup fails before any weight loads
        check_parallel(train, dist.world_size, resolve_dtype(train.dtype, dist.device))
        parts = setup(dist)
        trainer = Trainer(
            parts.model,
            config.train,
            config.log,
            parts.batches,
            run_dir,
            dist,
            parts.val_data,
            parts.hooks,
            parts.objective,
        )
        if resume_from is not None:
            trainer.resume(resume_from)
        elif start_over:
            trainer.start_over()
            if dist.is_main:
                print(f"{run_dir}: no checkpoint yet, starting from scratch", flush=True)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.toml").write_text(dump_config(config))
            for name, text in (notes or {}).items():
                if resume_from is None:  # a resumed run keeps its original notes
                    (run_dir / name).write_text(text)
            _announce(trainer, config, run_dir)
        trainer.fit()
        return run_dir
    finally:
        if own_dist:
            shutdown_distributed(dist)
