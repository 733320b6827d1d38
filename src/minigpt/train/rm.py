"""Reward modelling from preference pairs (Bradley-Terry, as in InstructGPT) on the shared Trainer.

`rm(config, run_dir, resume_from, init)` is what `minigpt rm` runs, on one process or on every
process that torchrun starts. The model is a `minigpt.reward.RewardModel`: the trunk of `init`
(usually the SFT run) and a fresh scalar head, read at the last real token of prompt + reply +
`<|END|>`. Pairs come from the same sources, formats and held-out split as `minigpt dpo`. With
r_c and r_r the rewards of the chosen and the rejected sequence, a pair's loss is

    -log sigmoid(r_c - r_r) + rm.center_rewards_coefficient * (r_c + r_r)^2

the second term (TRL's reward centring) keeping rewards near 0 without changing their order.

Metrics, named as TRL's RewardTrainer names them: `accuracy` (share of pairs with r_c > r_r),
`margin` (mean r_c - r_r), `mean_reward` (mean of every reward), `min_reward` / `max_reward` (over
every micro-batch and rank of the step) on each training step; the same on the held-out pairs at
every eval, with the `eval_` prefix, beside `val_loss` (their mean loss). `score_pairs` + `reward_metrics` are also what
`minigpt eval reward` runs on any pairs file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from minigpt.config import RMSection, RunConfig
from minigpt.data.chat import bucket_length
from minigpt.data.preference import RenderedPair
from minigpt.device import autocast, resolve_dtype
from minigpt.errors import MinigptError
from minigpt.reward import RewardModel, collate_sequences
from minigpt.tokenizer import get_tokenizer
from minigpt.train.distributed import DistContext, gather_objects
from minigpt.train.finetune import (
    INIT_NOTE,
    PairBatches,
    batch_lengths,
    init_model,
    load_pairs,
    starting_model,
)
from minigpt.train.run import StageParts, run_training
from minigpt.train.trainer import EvalHook

TRAIN_METRICS = ("accuracy", "margin", "mean_reward", "min_reward", "max_reward")


def check_rm_section(section: RMSection) -> None:
    if not section.center_rewards_coefficient >= 0:
        raise MinigptError(
            f"rm.center_rewards_coefficient={section.center_rewards_coefficient} must be >= 0 "
            "(0 = no centring; TRL suggests 0.01)"
        )


def collate_reward_pairs(
    pairs: Sequence[RenderedPair], pad_id: int, buckets: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """B pairs -> (ids (2B, T), lengths (2B,)): the B whole chosen sequences (prompt + reply),
    then the B rejected ones, right-padded to the smallest of `buckets` that holds them."""
    sequences = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    ids, lengths = collate_sequences(sequences, pad_id)
    if buckets:
        width = bucket_length(ids.size(1), buckets)
        ids = F.pad(ids, (0, width - ids.size(1)), value=pad_id)
    return ids, lengths


def pair_losses(
    chosen: torch.Tensor, rejected: torch.Tensor, center_coefficient: float = 0.0
) -> torch.Tensor:
    """Per-pair Bradley-Terry losses, with the centring penalty when its coefficient is > 0."""
    losses = -F.logsigmoid(chosen - rejected)
    if center_coefficient > 0:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses


class RewardObjective:
    """The Trainer's objective for (ids, lengths) batches from `collate_reward_pairs`."""

    def __init__(self, section: RMSection):
        self.section = section

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return batch[0].size(0) // 2  # pairs

    def __call__(
        self, forward: Callable, batch: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = forward(*batch).chunk(2)
        losses = pair_losses(chosen, rejected, self.section.center_rewards_coefficient)
        c, r = chosen.detach(), rejected.detach()
        every = torch.cat([c, r])
        sums = ((c > r).float().sum(), (c - r).sum(), ((c + r) / 2).sum(), every.min(), every.max())
        return losses.mean(), dict(zip(TRAIN_METRICS, sums, strict=True))


def reward_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, center_coefficient: float = 0.0
) -> dict[str, float]:
    """loss, accuracy, margin, mean_reward, min_reward, max_reward of (N,) paired rewards."""
    every = torch.cat([chosen, rejected]).double()
    return {
        "loss": pair_losses(chosen.double(), rejected.double(), center_coefficient).mean().item(),
        "accuracy": (chosen > rejected).double().mean().item(),
        "margin": (chosen - rejected).double().mean().item(),
        "mean_reward": every.mean().item(),
        "min_reward": every.min().item(),
        "max_reward": every.max().item(),
    }


@torch.no_grad()
def score_pairs(
    model: RewardModel,
    pairs: Sequence[RenderedPair],
    micro_batch: int,
    pad_id: int,
    dtype: torch.dtype = torch.float32,
    dist: DistContext | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) rewards of each pair's chosen and rejected sequence, float32 on the CPU. Rank r
    scores pairs r, r + world_size, ...; every rank gets all of them."""
    dist = dist or DistContext()
    device = next(model.parameters()).device
    mine = list(pairs)[dist.rank :: dist.world_size]
    values = []
    for start in range(0, len(mine), micro_batch):
        ids, lengths = collate_reward_pairs(mine[start : start + micro_batch], pad_id)
        with autocast(device, dtype):
            rewards = model(ids.to(device), lengths.to(device))
        values.append(rewards.float().view(2, -1).T.cpu())
    computed = torch.cat(values) if values else torch.empty(0, 2)
    table = torch.empty(len(pairs), 2)
    for rank, rows in enumerate(gather_objects(computed, dist)):
        table[rank :: dist.world_size] = rows
    return table[:, 0], table[:, 1]


def reward_eval_hook(
    pairs: Sequence[RenderedPair], config: RunConfig, dist: DistContext
) -> EvalHook:
    """`val_loss` and the `eval_` metrics over the held-out pairs every `train.eval_every` steps."""
    micro_batch, pad_id = config.train.micro_batch, get_tokenizer().eot_id
    dtype = resolve_dtype(config.train.dtype, dist.device)
    coefficient = config.rm.center_rewards_coefficient

    def evaluate(step: int, model: RewardModel) -> dict:
        chosen, rejected = score_pairs(model, pairs, micro_batch, pad_id, dtype, dist)
        metrics = reward_metrics(chosen, rejected, coefficient)
        return {"val_loss": metrics.pop("loss"), **{f"eval_{k}": v for k, v in metrics.items()}}

    return EvalHook("rewards", config.train.eval_every, evaluate)


def rm(
    config: RunConfig,
    run_dir: str | Path,
    resume_from: str | Path | None = None,
    init: str | Path | None = None,
    dist: DistContext | None = None,
) -> Path:
    """Train a reward model from `init` on `config.data`'s pairs into `run_dir`, continuing from
    `resume_from` (a run or checkpoint directory) when given. Returns the run directory."""
    check_rm_section(config.rm)
    run_dir = Path(run_dir)
    init = starting_model(init, run_dir, resume_from, "rm")

    def setup(dist: DistContext) -> StageParts:
        cfg = config.train
        torch.manual_seed(cfg.seed)  # the same head on every rank
        model = init_model(init, cfg.sequence_length, head=None)
        if not isinstance(model, RewardModel):
            model = RewardModel.from_language_model(model)
        model = model.to(dist.device)
        torch.manual_seed(cfg.seed + dist.rank)  # different dropout masks per rank
        tokenizer = get_tokenizer()
        # the whole sequence is the input: prompt + reply within sequence_length tokens
        train, val = load_pairs(config, tokenizer, dist.is_main, cfg.sequence_length)
        batches = PairBatches(
            train,
            cfg.micro_batch,
            cfg.seed,
            tokenizer.eot_id,
            dist.rank,
            dist.world_size,
            batch_lengths(cfg),
            collate_fn=collate_reward_pairs,
        )
        hooks = [reward_eval_hook(val, config, dist)] if val else []
        return StageParts(model, batches, hooks=hooks, objective=RewardObjective(config.rm))

    notes = {INIT_NOTE: f"{init}\n"} if resume_from is None else {}
    return run_training(config, run_dir, resume_from, dist, setup, notes)
