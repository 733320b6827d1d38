"""Pre-training wiring: a RunConfig becomes a model, token loaders and eval hooks for the Trainer.

`pretrain(config, run_dir, resume)` is what `minigpt train` runs, on one process or on every
process that torchrun starts (its lifecycle: `run.run_training`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from minigpt.checkpoint import WEIGHTS
from minigpt.config import EvalSection, ModelSection, RunConfig
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
    sampling = Sampling(top_k=top_k or None)  # top_k 0: the whole vocabulary

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


def hellaswag_hook(section: EvalSection, dist: DistContext | None = None) -> EvalHook:
    """HellaSwag accuracy every `section.hellaswag_every` steps, on every rank (the evaluator
    shards the examples across ranks and sums the counts). Examples load once, up front, so a
    bad path fails before training starts."""
    from minigpt.evals import hellaswag

    source = section.hellaswag_data or None
    fetch_on_local_rank_zero(lambda: hellaswag.fetch(source), dist or DistContext())
    examples = hellaswag.load_examples(source, limit=section.hellaswag_limit or None)

    def score(step: int, model: GPT) -> dict:
        device = next(model.parameters()).device
        result = hellaswag.evaluate(model, examples, device, section.hellaswag_batch_size)
        return {"hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"]}

    return EvalHook("hellaswag", section.hellaswag_every, score)


def tasks_hook(section: EvalSection) -> EvalHook:
    """The benchmark tasks `section.tasks` every `section.tasks_every` steps, sharded across
    ranks like HellaSwag; logs each task's acc and acc_norm and the CORE-style mean."""
    from minigpt.evals import multiple_choice
    from minigpt.evals.suite import centered
    from minigpt.evals.tasks import get_task

    try:
        tasks = [get_task(name) for name in section.tasks]
    except MinigptError as e:
        raise MinigptError(f"eval.tasks: {e}") from e
    limit = section.tasks_limit or None
    examples = {task.name: task.load(limit=limit).examples for task in tasks}

    def score(step: int, model: GPT) -> dict:
        device = next(model.parameters()).device
        metrics, core = {}, []
        for task in tasks:
            result = multiple_choice.evaluate(
                model, examples[task.name], device, section.tasks_batch_size
            )
            metrics[f"{task.name}_acc"] = result["acc"]
            metrics[f"{task.name}_acc_norm"] = result["acc_norm"]
            core.append(centered(result[task.primary], result["random"]))
        metrics["tasks_core"] = sum(core) / len(core)
        return metrics

    return EvalHook("tasks", section.tasks_every, score)


def resume_source(resume: str, out: str | Path | None) -> tuple[Path, Path]:
    """(what to resume from, the run directory to continue in) for `--resume latest|PATH`."""
    if resume == "latest":
        if out is None:
            raise MinigptError("--resume latest needs --out RUN (the run to continue)")
        return Path(out), Path(out)
    path = Path(resume)
    if not path.exists():
        raise MinigptError(f"--resume {resume}: no such run or checkpoint directory")
    if (path / WEIGHTS).is_file():  # a checkpoint directory: RUN/checkpoints/step_N
        return path, Path(out) if out is not None else path.parent.parent
    return path, Path(out) if out is not None else path


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
        if ev.hellaswag_every > 0:
            hooks.append(hellaswag_hook(ev, dist))
        if ev.tasks_every > 0 and ev.tasks:
            hooks.append(tasks_hook(ev))
        if ev.sample_tokens > 0 and ev.sample_prompts:
            hooks.append(
                sampling_hook(
                    ev.sample_prompts, ev.sample_tokens, ev.sample_top_k, cfg.eval_every, cfg.seed
                )
            )
        return StageParts(model, loader, val, hooks)

    return run_training(config, run_dir, resume_from, dist, setup)
