"""The training loop, shared by pre-training and fine-tuning.

One optimizer step = `accum` micro-steps on every process. Each micro-step's loss is weighted by
its share of the step's target tokens (targets equal to -100 do not count), so accumulated
micro-batches, several processes, and one big batch all give the same gradient, also when
fine-tuning batches mask different numbers of tokens. The loop never waits on the GPU inside the
accumulation: the loss is summed on the device and read once per step, for logging, in the same
all-reduce that carries the tokens fed and the ranks' stop / checkpoint requests. The next step's
micro-batches are read on a background thread while this one runs (`prefetch.StepPrefetcher`).

Losing little work: besides every `checkpoint_every` steps, a checkpoint is written when
`checkpoint_minutes` have passed since the last one (rank 0's clock decides, so all ranks agree);
on SIGTERM or SIGUSR1 (what clusters send before preemption) the current step finishes, a
checkpoint is written, and `fit` raises `TrainingInterrupted`, which the CLI turns into exit status
75 (EX_TEMPFAIL: "try again"); `--resume latest` then loses nothing.

What the Trainer plugs together, so other tasks can bring their own parts:
- `batches`: a `BatchSource` (`next_batch() -> (inputs, targets)` on the CPU, or another tuple
  of tensors its objective reads, plus `state_dict()` / `load_state_dict()` so checkpoints
  capture its position; `ignores_targets = False` when no target is ever -100, which spares
  counting them across ranks each step);
- `objective`: an `Objective`, the loss of one micro-batch (default `TokenLoss`: next-token
  cross-entropy); DPO brings its own;
- `val_data`: an `EvalData` (`batches()` yields the same (inputs, targets) every call);
- `eval_hooks`: `EvalHook`s, each `fn(step, model) -> {metric: value}` run every `every` steps
  on every rank (a hook may reduce across ranks itself); rank 0 logs the numbers as scalars and
  strings as text. Text samples and benchmark tasks plug in here.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from minigpt import checkpoints
from minigpt.config import LogSection, TrainSection
from minigpt.device import autocast, peak_flops, resolve_dtype
from minigpt.errors import MinigptError, TrainingInterrupted
from minigpt.model import GPT, IGNORE_INDEX, GPTConfig
from minigpt.train import parallel
from minigpt.train.distributed import (
    DistContext,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    gather_objects,
)
from minigpt.train.logger import RunLogger
from minigpt.train.optim import (
    build_optimizer,
    cosine_lr,
    grad_accum_steps,
    load_optimizer_state,
)
from minigpt.train.prefetch import StepPrefetcher

# `fit` stops after the current step and checkpoints on these (cluster preemption notices)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class BatchSource(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, ...]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class EvalData(Protocol):
    def batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]: ...


class Objective(Protocol):
    """A micro-batch's training loss: `count(batch)` is how many units (target tokens, pairs...)
    its loss averages over, read on the CPU before the step so micro-batches can be weighted
    without a device sync; calling it gives (mean loss, {metric: sum over the units}), metrics
    that the trainer sums over the step's micro-batches and ranks and logs per unit. A metric
    named `min_*` or `max_*` is an extreme instead: combined by min / max, logged as is."""

    def count(self, batch: tuple[torch.Tensor, ...]) -> int: ...
    def __call__(
        self, forward: Callable, batch: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class TokenLoss:
    """Next-token cross-entropy averaged over the targets that are not IGNORE_INDEX."""

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())  # CPU tensors: no sync

    def __call__(self, forward: Callable, batch: tuple[torch.Tensor, ...]):
        _, loss = forward(*batch)
        return loss, {}


@dataclass
class EvalHook:
    """`fn(step, model)` every `every` steps (and at the last step); model is in eval mode. A hook
    whose parts keep several cadences runs at their greatest common divisor and returns {} when
    none is due; a step whose hooks return nothing, with no validation due, logs no line."""

    name: str
    every: int
    fn: Callable[[int, GPT], dict]


class Trainer:
    def __init__(
        self,
        model: GPT,
        train: TrainSection,
        log: LogSection,
        batches: BatchSource,
        run_dir: str | os.PathLike,
        dist: DistContext | None = None,
        val_data: EvalData | None = None,
        eval_hooks: Sequence[EvalHook] = (),
        objective: Objective | None = None,
    ):
        self.cfg, self.log_cfg = train, log
        self.objective = objective or TokenLoss()
        self.dist = dist or DistContext()
        self.device = self.dist.device
        self.run_dir = Path(run_dir)
        self.val_data, self.eval_hooks = val_data, list(eval_hooks)
        self.accum = grad_accum_steps(
            train.total_batch_tokens, train.micro_batch, train.sequence_length, self.dist.world_size
        )
        self.batches = StepPrefetcher(
            batches, self.accum, self.objective.count, pin_memory=self.device.type == "cuda"
        )
        self.dtype = resolve_dtype(train.dtype, self.device)
        parallel.check_parallel(train, self.dist.world_size, self.dtype)
        self.sharded = parallel.is_sharded(train, self.dist.world_size)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for the matmuls autocast leaves
        self.model = parallel.prepare_model(
            model.to(self.device), train, self.dist.world_size, self.dtype
        )
        self.optimizer = build_optimizer(
            self.model, train, parallel.optimizer_device_type(train, self.device)
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.dtype == torch.float16
        )  # fp16 gradients underflow without loss scaling; bf16 and fp32 do not need it
        # compile only the training forward: evaluation and sampling use the plain model. Static
        # shapes, one graph per batch shape: pre-training has one, fine-tuning a few bucketed
        # lengths (finetune.batch_lengths). Dynamic shapes would make the length symbolic, which
        # breaks the graph at attention's is_causal and recompiles the head's chunk loop for
        # every length until dynamo's recompile limit sends the forward back to eager.
        forward = torch.compile(self.model, dynamic=False) if train.compile else self.model
        if self.dist.distributed and not self.sharded:
            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = DDP(forward, device_ids=ids)
        self.forward = forward
        self.step = 0
        self.resumed_from: int | None = None
        self.peak_flops = peak_flops(self.device, self.dtype, log.peak_tflops)
        self._stop_signal: int | None = None  # set by the signal handler during `fit`
        self._flops: dict[int, int] = {}  # training FLOPs per token, by sequence length
        self._last_checkpoint = time.monotonic()

    # ------------------------------------------------------------------------------ state
    def training_state(self) -> dict:
        """Everything besides the weights needed to continue exactly (rank 0 saves it); a
        sharded run's optimizer state goes into the shards instead."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "step": self.step,
            "scaler": self.scaler.state_dict(),
            "batches": self.batches.state_dict(),
            "rng": gather_objects(rng, self.dist),  # per rank: dropout masks differ by rank
        }
        if not self.sharded:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def restore(self, directory: Path, weights: GPT | None, state: dict) -> None:
        """Continue from a checkpoint's weights (None: read from its shards) and training state.
        Full and sharded checkpoints resume under either parallel mode, on any process count."""
        if weights is None:
            if self.cfg.optimizer != "adamw":
                raise MinigptError(
                    f"{directory}: a sharded (FSDP) checkpoint holds AdamW's state; resume it "
                    "with --train.optimizer=adamw"
                )
            parallel.load_sharded(
                directory / checkpoints.SHARDED,
                self.model,
                self.optimizer,
                state["optimizer_groups"],
            )
        elif self.sharded:
            parallel.load_full(self.model, weights.state_dict(), self.optimizer, state["optimizer"])
        else:
            self.model.load_state_dict(weights.state_dict())
            load_optimizer_state(self.optimizer, state["optimizer"], self.cfg)
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["batches"])
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            torch.set_rng_state(rngs[self.dist.rank]["cpu"])
            if "cuda" in rngs[self.dist.rank] and self.device.type == "cuda":
                torch.cuda.set_rng_state(rngs[self.dist.rank]["cuda"], self.device)
        else:  # the data stream does not depend on the process count, random draws do
            warnings.warn(
                f"checkpoint was written by {len(rngs)} process(es), this run has "
                f"{self.dist.world_size}: same data order, but new dropout random streams",
                stacklevel=2,
            )
        self.step = self.resumed_from = state["step"]

    def start_over(self) -> None:
        """Mark a fresh start in a run directory that holds records but no checkpoint: its
        records are dropped (as a resume at step 0 minus its first evaluation would)."""
        self.resumed_from = -1

    def resume(self, path: str | os.PathLike) -> Path:
        """Continue from a run directory's newest readable checkpoint, or from a checkpoint
        directory; returns the checkpoint used."""
        directory, weights, state = checkpoints.find_resumable(path, consolidate=False)
        config = GPTConfig.from_dict(checkpoints.read_meta(directory)["config"])
        shape = lambda c: {**c.to_dict(), "dropout": None}  # noqa: E731 (dropout may change)
        if shape(config) != shape(self.model.config):
            raise MinigptError(
                f"{directory}: checkpoint model {config} differs from the config's "
                f"{self.model.config}; resume with the run's own config"
            )
        self.restore(directory, weights, state)
        if self.dist.is_main:
            print(f"resuming from {directory} at step {self.step}", flush=True)
            moved = checkpoints.set_aside_future(self.run_dir, self.step)
            if moved:
                print(
                    f"moved {len(moved)} checkpoint(s) past step {self.step} "
                    f"({', '.join(p.name for p in moved)}), an abandoned branch, to "
                    f"{moved[0].parent}",
                    flush=True,
                )
        return directory

    def save_checkpoint(self) -> None:
        self._last_checkpoint = time.monotonic()
        state = self.training_state()  # a collective: every rank takes part
        if self.sharded:  # every rank writes its shard
            shards, state["optimizer_groups"] = parallel.sharded_state(self.model, self.optimizer)
            checkpoints.save_checkpoint(
                self.run_dir,
                self.step,
                self.model,
                state,
                self.cfg.keep_last,
                shards,
                self.dist.is_main,
            )
        elif self.dist.is_main:
            checkpoints.save_checkpoint(
                self.run_dir, self.step, self.model, state, self.cfg.keep_last
            )
        # no rank runs ahead (or exits, when stopping) before the checkpoint is whole; the
        # wait is what train.dist_timeout_minutes must cover
        barrier(self.dist)

    # ------------------------------------------------------------------------------ steps
    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host to device; asynchronous on CUDA, where the prefetcher has pinned the memory."""
        return t.to(self.device, non_blocking=True)

    def _autocast(self):
        return autocast(self.device, self.dtype)

    def _total_count(self, counts: list[int]) -> int:
        """Counted units (target tokens, pairs) over all micro-batches of all ranks. Without
        ignored targets every rank feeds the same number, so no all-reduce (a host-device sync)
        is needed."""
        total = sum(counts)
        if not self.batches.ignores_targets:
            return total * self.dist.world_size
        if self.dist.distributed:
            total = int(all_reduce_sum(torch.tensor(total, device=self.device), self.dist).item())
        return max(1, total)

    def _flops_per_token(self, seq_len: int) -> int:
        if seq_len not in self._flops:  # a few lengths per run; counting parameters is not free
            self._flops[seq_len] = self.model.flops_per_token(seq_len)
        return self._flops[seq_len]

    def _requests(self) -> tuple[float, float]:
        """(stop, checkpoint) votes of this rank: a stop signal arrived; rank 0's clock says
        `checkpoint_minutes` have passed."""
        minutes = self.cfg.checkpoint_minutes
        due = (
            self.dist.is_main
            and minutes > 0
            and time.monotonic() - self._last_checkpoint >= 60 * minutes
        )
        return float(self._stop_signal is not None), float(due)

    def train_step(self) -> dict:
        """One optimizer step; returns its logged numbers (the only device sync of the step):
        train_loss, lr, grad_norm, tokens (fed to the model, padding included, all ranks),
        flops (the model's, all ranks), and the ranks' votes stop / checkpoint (> 0: yes)."""
        cfg = self.cfg
        lr = cosine_lr(self.step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        for group in self.optimizer.param_groups:  # Muon's matrices at muon_lr / max_lr of it
            group["lr"] = lr * group["lr_scale"]
        # a source that samples from the model (RL rollouts) runs forwards of its own
        with nullcontext() if self.batches.read_ahead else self._gathered():
            step_batches = self.batches.next_step()
        counts, total = step_batches.counts, self._total_count(step_batches.counts)
        loss_sum = torch.zeros((), device=self.device)
        tokens = flops = 0
        metric_sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(step_batches.micro_batches):
            last = i == self.accum - 1
            # DDP and FSDP average gradients over ranks, so each rank's share is scaled up by world size
            weight = counts[i] * self.dist.world_size / total
            with parallel.gradient_sync(self.forward, last):
                with self._autocast():
                    loss, sums = self.objective(self.forward, tuple(map(self._to_device, batch)))
                loss = loss * weight
                loss_sum += loss.detach()
                for name, value in sums.items():
                    metric_sums[name] = _combine(name, metric_sums.get(name), value.detach())
                self.scaler.scale(loss).backward()
            inputs = batch[0]  # every row the model reads, padding included
            tokens += inputs.numel()
            flops += inputs.numel() * self._flops_per_token(inputs.size(1))
        self.scaler.unscale_(self.optimizer)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        # on FSDP's gradient shards the norm is reduced over ranks: the same as one process's
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        grad_norm = parallel.whole_norm(grad_norm).to(self.device)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # one all-reduce and one read for everything the step reports
        extremes = {n: v for n, v in metric_sums.items() if n.startswith(EXTREMES)}
        metric_sums = {n: v for n, v in metric_sums.items() if n not in extremes}
        on_device = torch.stack([t.double() for t in (loss_sum, grad_norm, *metric_sums.values())])
        on_host = torch.tensor([tokens, flops, *self._requests()], dtype=torch.float64)
        summed = torch.cat([on_device, on_host.to(self.device, non_blocking=True)])
        summed = all_reduce_sum(summed, self.dist)
        summed[:2] /= self.dist.world_size  # grad_norm: the same on every rank
        loss, norm, *values = summed.tolist()
        *sums, tokens, flops, stop, checkpoint = values
        stats = {
            "train_loss": loss,
            "lr": lr,
            "grad_norm": norm,
            "tokens": int(tokens),
            "flops": flops,
            "stop": stop,
            "checkpoint": checkpoint,
        }
        # objective metrics per unit (pair, token) over the whole step, all ranks
        stats.update({name: value / total for name, value in zip(metric_sums, sums, strict=True)})
        if extremes:  # a second read, only for objectives that report extremes (reward models)
            stats.update(_reduce_extremes(extremes, self.dist))
        stats.update(step_batches.metrics)  # the batch source's own (RL rollouts' rewards...)
        return stats

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean loss over every target token of `val_data`, all ranks together, under the
        training autocast (the model's loss is scored in fp32 either way)."""
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)
        for x, y in self.val_data.batches():
            x, y = self._to_device(x), self._to_device(y)
            with self._autocast():
                _, loss = self.model(x, y)
            n = (y != IGNORE_INDEX).sum()
            totals[0] += torch.nan_to_num(loss.double()) * n  # a fully masked batch adds 0
            totals[1] += n
        all_reduce_sum(totals, self.dist)
        return (totals[0] / totals[1].clamp(min=1)).item()

    def evaluate(self, hooks: Sequence[EvalHook], with_val: bool) -> dict:
        """Validation loss and the given hooks' metrics, on the plain (uncompiled) model."""
        metrics = {}
        self.model.eval()
        with self._gathered():
            if with_val and self.val_data is not None:
                metrics["val_loss"] = self.validation_loss()
            for hook in hooks:  # the training autocast, as build-nanogpt evaluates
                with torch.no_grad(), self._autocast():
                    metrics.update(hook.fn(self.step, self.model))
        self.model.train()
        return metrics

    def _gathered(self):
        """Under FSDP, the full weights on every rank for forwards that ranks run in different
        numbers (sampling, each rank's own examples); no-op otherwise."""
        return parallel.gathered(self.model) if self.sharded else nullcontext()

    # ------------------------------------------------------------------------------ loop
    def _due(self, every: int) -> bool:
        return self.step == self.cfg.max_steps or (every > 0 and self.step % every == 0)

    def _run_evals(self, logger: RunLogger, first: bool) -> None:
        hooks = [h for h in self.eval_hooks if first or self._due(h.every)]
        with_val = first or self._due(self.cfg.eval_every)
        if hooks or with_val:
            metrics = self.evaluate(hooks, with_val)
            if not (metrics or with_val):
                return
            logger.log(self.step, metrics)
            if self.dist.is_main:
                tqdm.write(_describe_eval(self.step, metrics))

    def _train_metrics(self, stats: dict, seconds: float) -> dict:
        """What a step logs: its numbers, with tokens/s and MFU from the tokens actually fed
        (fine-tuning batches are padded to varying lengths) and their FLOPs; the objective's
        metrics (DPO rewards...) pass through."""
        internal = ("tokens", "flops", "stop", "checkpoint")
        logged = {k: v for k, v in stats.items() if k not in internal}
        logged["tokens_per_sec"] = stats["tokens"] / seconds
        mfu = self.mfu(stats["flops"], seconds)
        if mfu is not None:
            logged["mfu"] = mfu
        return logged

    def mfu(self, flops: float, seconds: float) -> float | None:
        """Model FLOPs utilisation: `flops` of all ranks (a step's `flops`) done in `seconds`, as
        a fraction of the ranks' peak; None where the device's peak is unknown."""
        if not self.peak_flops:
            return None
        return flops / seconds / self.dist.world_size / self.peak_flops

    def _on_stop_signal(self, signum: int, frame) -> None:
        self._stop_signal = signum  # acted on after the current step, by every rank

    def fit(self) -> None:
        """Train from `self.step` to `train.max_steps`, evaluating, logging and checkpointing."""
        logger = RunLogger(
            self.run_dir,
            enabled=self.dist.is_main,
            tensorboard=self.log_cfg.tensorboard,
            resume_step=self.resumed_from,
        )
        bar = tqdm(
            total=self.cfg.max_steps,
            initial=self.step,
            disable=not (self.dist.is_main and self.log_cfg.progress),
            unit="step",
            dynamic_ncols=True,
        )
        handlers = {}
        if threading.current_thread() is threading.main_thread():  # where Python runs handlers
            handlers = {s: signal.signal(s, self._on_stop_signal) for s in STOP_SIGNALS}
        self._last_checkpoint = time.monotonic()
        try:
            if self.resumed_from is None or self.resumed_from < 0:
                self._run_evals(logger, first=True)
            self.model.train()
            while self.step < self.cfg.max_steps:
                start = time.perf_counter()
                stats = self.train_step()
                self.step += 1
                logged = self._train_metrics(stats, time.perf_counter() - start)
                logger.log(self.step, logged)
                bar.set_postfix_str(_describe_step(logged), refresh=False)
                bar.update()
                self._run_evals(logger, first=False)
                if self._due(self.cfg.checkpoint_every) or stats["stop"] or stats["checkpoint"]:
                    self.save_checkpoint()
                if stats["stop"]:
                    raise TrainingInterrupted(self.step, self._stop_signal or signal.SIGTERM)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            bar.close()
            logger.close()
            self.batches.close()


def _describe_step(stats: dict) -> str:
    text = (
        f"loss {stats['train_loss']:.4f} lr {stats['lr']:.2e} norm {stats['grad_norm']:.2f} "
        f"{stats['tokens_per_sec']:,.0f} tok/s"
    )
    return text + (f" mfu {100 * stats['mfu']:.1f}%" if "mfu" in stats else "")


EXTREMES = ("min_", "max_")  # objective metrics combined by min / max, not summed


def _combine(name: str, old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """One micro-batch's metric folded into the step's: a sum, or a min / max for extremes."""
    if old is None:
        return new
    if name.startswith("min_"):
        return torch.minimum(old, new)
    if name.startswith("max_"):
        return torch.maximum(old, new)
    return old + new


def _reduce_extremes(extremes: dict[str, torch.Tensor], ctx: DistContext) -> dict[str, float]:
    """The step's min_* / max_* metrics over every rank, with one max all-reduce (mins negated)."""
    signs = [-1.0 if name.startswith("min_") else 1.0 for name in extremes]
    values = torch.stack([v.double() * s for v, s in zip(extremes.values(), signs, strict=True)])
    values = all_reduce_max(values, ctx).tolist()
    return {name: v * s for name, v, s in zip(extremes, values, signs, strict=True)}


def _describe_eval(step: int, metrics: dict) -> str:
    lines = [
        f"step {step}: {name} {value:.4f}"
        for name, value in metrics.items()
        if isinstance(value, int | float)
    ]
    for name, value in metrics.items():
        if isinstance(value, list):
            lines += [f"step {step}: {name}: {text!r}" for text in value]
    return "\n".join(lines)
