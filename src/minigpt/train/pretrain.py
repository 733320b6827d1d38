"""Pre-training wiring: a RunConfig becomes a model, token loaders and eval hooks for the Trainer.

`pretrain(config, run_dir, resume)` is what `minigpt train` runs, on one process or on every
process that torchrun starts (its lifecycle: `run.run_training`). Besides validation loss, one
hook scores every configured benchmark task (`tasks_hook`) and one samples text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from minigpt.config import EvalSection, ModelSection, RunConfig, TaskSchedule
from minigpt.data.shards import TokenLoader, ValidationSet
from minigpt.errors import MinigptError
from minigpt.model import GPT, GPT2_VOCAB_SIZE, PRESETS, GPTConfig
from minigpt.train.distributed import DistContext, gather_objects
from minigpt.train.run import StageParts, run_training
from minigpt.train.trainer import EvalHook


def build_model(section: ModelSection, seq_len: int) -> GPT:
    """A freshly initialised GPT: the preset's shape with the section's overrides."""
    if section.preset not in PRESETS:
        raise MinigptError(
            f"model.preset={section.preset!r} is unknown; choose one of {', '.join(PRESETS)}"
        )
    shape = {
        name: getattr(section, name)
        for name in ("n_layer", "n_head", "n_embd", "block_size")
        if getattr(section, name) is not None
    }
    try:
        config = GPTConfig.from_preset(section.preset, dropout=section.dropout, **shape)
    except ValueError as e:
        raise MinigptError(f"[model] section: {e}") from e
    if seq_len > config.block_size:
        raise MinigptError(
            f"train.sequence_length={seq_len} exceeds the model's context "
            f"(block_size={config.block_size}); lower it or set model.block_size"
        )
    return GPT(config)


def sampling_hook(
    prompts: list[str], max_new_tokens: int, top_k: int, every: int, seed: int
) -> EvalHook:
    """An eval hook that continues each prompt with the inference engine (top-k, only GPT-2's
    own tokens); its own seeded generator leaves the training RNG untouched, so sampling never
    changes what a resumed run computes."""
    from minigpt.engine import Engine, Sampling
    from minigpt.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    prompt_ids = [tokenizer.encode(prompt) for prompt in prompts]
    sampling = Sampling(top_k=top_k)  # top_k 0: the whole vocabulary

    def sample(step: int, model: GPT) -> dict:
        outputs = Engine(model, GPT2_VOCAB_SIZE).generate(
            prompt_ids, max_new_tokens, sampling, seed=seed
        )
        return {"samples": [p + tokenizer.decode(o) for p, o in zip(prompts, outputs, strict=True)]}

    return EvalHook("samples", every, sample)


def fetch_on_local_rank_zero(fetch: Callable[[], object], dist: DistContext) -> None:
    """Run `fetch` (a download into a shared cache) on each node's local rank 0 while the other
    ranks wait; a failure on any node is raised on every rank, so none waits forever."""
    error = None
    if dist.local_rank == 0:
        try:
            fetch()
        except MinigptError as e:
            error = str(e)
    errors = [e for e in gather_objects(error, dist) if e]  # also the barrier
    if errors:
        raise MinigptError(errors[0])


class _TaskEval(NamedTuple):
    """One task the task hook scores: its examples, cadence, batch size, and whether it counts
    towards tasks_core (the tasks of `eval.tasks`) and by which metric."""

    name: str
    examples: list
    every: int
    batch_size: int
    core_metric: str | None


def _scheduled_examples(name: str, schedule: TaskSchedule, dist: DistContext) -> list:
    """A `[eval.task.<name>]` task's examples, from where `minigpt eval <name> --data` reads them:
    HellaSwag's official file is downloaded once, on each node's local rank 0."""
    from minigpt.evals import hellaswag
    from minigpt.evals.tasks import get_task

    try:
        task = get_task(name)
    except MinigptError as e:
        raise MinigptError(f"eval.task.{name}: {e}") from e
    source, limit = schedule.data or None, schedule.limit or None
    if task is hellaswag.TASK:
        fetch_on_local_rank_zero(lambda: hellaswag.fetch(source), dist)
        return hellaswag.load_examples(source, limit=limit)
    return task.load(source, limit=limit).examples


def _task_evals(section: EvalSection, dist: DistContext) -> list[_TaskEval]:
    """The configured tasks, loaded: each `[eval.task.<name>]` table, then `eval.tasks`."""
    from minigpt.evals.tasks import get_task

    evals = [
        _TaskEval(name, _scheduled_examples(name, s, dist), s.every, s.batch_size, None)
        for name, s in section.task.items()
        if s.every > 0
    ]
    if section.tasks_every > 0 and section.tasks:
        try:
            tasks = [get_task(name) for name in section.tasks]
        except MinigptError as e:
            raise MinigptError(f"eval.tasks: {e}") from e
        limit = section.tasks_limit or None
        evals += [
            _TaskEval(
                task.name,
                task.load(limit=limit).examples,
                section.tasks_every,
                section.tasks_batch_size,
                task.primary,
            )
            for task in tasks
        ]
    return evals


def tasks_hook(
    section: EvalSection, max_steps: int | None = None, dist: DistContext | None = None
) -> EvalHook | None:
    """The one eval hook of every benchmark task configured, None if there is none: each
    `[eval.task.<name>]` (HellaSwag among them) every `every` steps, then the tasks `eval.tasks`
    every `eval.tasks_every` steps with their CORE-style mean `tasks_core`, all of them at step
    `max_steps`. Each is scored on every rank (the evaluator shards the examples across ranks
    and sums the counts) and logged as <task>_acc and <task>_acc_norm. Examples load once, up
    front, so a bad name or path fails before training starts."""
    from minigpt.evals import multiple_choice
    from minigpt.evals.suite import centered

    evals = _task_evals(section, dist or DistContext())
    if not evals:
        return None

    def score(step: int, model: GPT) -> dict:
        device = next(model.parameters()).device
        metrics, core = {}, []
        for task in evals:
            if step != max_steps and step % task.every:
                continue
            result = multiple_choice.evaluate(model, task.examples, device, task.batch_size)
            metrics[f"{task.name}_acc"] = result["acc"]
            metrics[f"{task.name}_acc_norm"] = result["acc_norm"]
            if task.core_metric is not None:
                core.append(centered(result[task.core_metric], result["random"]))
        if core:
            metrics["tasks_core"] = sum(core) / len(core)
        return metrics

    return EvalHook("tasks", math.gcd(*(task.every for task in evals)), score)


def pretrain(
    config: RunConfig,
    run_dir: str | Path,
    resume_from: str | Path | None = None,
    eval_hooks: Sequence[EvalHook] = (),
    dist: DistContext | None = None,
) -> Path:
    """Train per `config` into `run_dir`, continuing from `resume_from` (a run or checkpoint
    directory) when given. `eval_hooks` run besides validation loss and text samples. Returns the
    run directory."""

    def setup(dist: DistContext) -> StageParts:
        cfg, ev = config.train, config.eval
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = build_model(config.model, cfg.sequence_length)
        torch.manual_seed(cfg.seed + dist.rank)  # but different dropout masks
        loader = TokenLoader(
            config.data.dir,
            "train",
            cfg.micro_batch,
            cfg.sequence_length,
            cfg.seed,
            dist.rank,
            dist.world_size,
        )
        val = ValidationSet(
            config.data.dir,
            cfg.sequence_length,
            ev.val_tokens,
            cfg.micro_batch,
            dist.rank,
            dist.world_size,
        )
        hooks = list(eval_hooks)
        tasks = tasks_hook(ev, cfg.max_steps, dist)
        if tasks is not None:
            hooks.append(tasks)
        if ev.sample_tokens > 0 and ev.sample_prompts:
            hooks.append(
                sampling_hook(
                    ev.sample_prompts, ev.sample_tokens, ev.sample_top_k, cfg.eval_every, cfg.seed
                )
            )
        return StageParts(model, loader, val, hooks)

    return run_training(config, run_dir, resume_from, dist, setup)
