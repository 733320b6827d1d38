"""Direct Preference Optimization (Rafailov et al. 2023) on the shared Trainer.

`dpo(config, run_dir, resume_from, init)` is what `minigpt dpo` runs, on one process or on every
process that torchrun starts. The policy starts from `init` (usually an SFT run) and the
reference is the same starting weights, frozen. A reply's log-probability log p(y|x) is summed
over its tokens (the reply and its `<|END|>`, never the prompt or padding), from fp32 logits:
fp16/bf16 log-softmax is where DPO's NaNs come from. With

    h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))

the losses (`dpo.loss_type`, beta = `dpo.beta`, eps = `dpo.label_smoothing`) are
    sigmoid  -(1-eps) log s(beta h) - eps log s(-beta h)   DPO; eps > 0 is conservative DPO
    robust   (-(1-eps) log s(beta h) + eps log s(-beta h)) / (1 - 2 eps)   robust DPO
             (Chowdhury et al. 2024): unbiased when a share eps of the labels is flipped
    ipo      (h - 1/(2 beta))^2                            IPO (Azar et al. 2023)
    hinge    max(0, 1 - beta h)                            SLiC (Zhao et al. 2023)

Metrics, named as TRL names them so runs compare: `rewards/chosen` and `rewards/rejected`
(beta (log pi - log ref) of each reply), `rewards/margins` (their difference),
`rewards/accuracies` (share of pairs whose chosen reward is the larger), `logps/chosen` and
`logps/rejected` (the policy's summed log-probs), averaged over the pairs of each training step;
on the held-out pairs at every eval with TRL's `eval_` prefix, beside `val_loss` (their loss).

Reference (`dpo.reference`): "precomputed" (default) computes the reference log-probs of every
pair once, before training, in a batched pass of the starting weights (the ranks share it) and
stores them in RUN/reference_logps.safetensors: training holds one model, and a resumed run reads
them back. "model" keeps a frozen copy of the starting weights on the device instead and runs it
on every micro-batch (one more forward per step, one more model in memory).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from minigpt.config import DPOSection, RunConfig
from minigpt.data.preference import RenderedPair, collate_pairs, fingerprint
from minigpt.device import autocast, resolve_dtype
from minigpt.errors import MinigptError
from minigpt.model import GPT, IGNORE_INDEX
from minigpt.tokenizer import get_tokenizer
from minigpt.train.distributed import (
    DistContext,
    all_reduce_sum,
    broadcast_object,
    gather_objects,
)
from minigpt.train.finetune import (
    INIT_NOTE,
    PairBatches,
    batch_lengths,
    chat_hook,
    init_model,
    load_pairs,
    starting_model,
)
from minigpt.train.run import StageParts, run_training
from minigpt.train.trainer import EvalHook

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")
REFERENCES = ("precomputed", "model")
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
REFERENCE_FILE = "reference_logps.safetensors"


def check_dpo_section(section: DPOSection) -> None:
    """Raise MinigptError naming the key unless the [dpo] settings make sense together."""
    loss, eps = section.loss_type, section.label_smoothing
    if not section.beta > 0:
        raise MinigptError(f"dpo.beta={section.beta} must be positive (0.1 is the usual start)")
    if loss not in LOSS_TYPES:
        raise MinigptError(f"dpo.loss_type={loss!r}; choose one of {', '.join(LOSS_TYPES)}")
    if not 0 <= eps < 0.5:
        raise MinigptError(f"dpo.label_smoothing={eps} must be in [0, 0.5)")
    if eps > 0 and loss not in ("sigmoid", "robust"):
        raise MinigptError(
            f"dpo.label_smoothing applies to the sigmoid and robust losses; set it to 0 for {loss}"
        )
    if loss == "robust" and eps == 0:
        raise MinigptError(
            "dpo.loss_type=robust needs dpo.label_smoothing > 0 (the assumed share of flipped "
            "labels); with 0 it is the sigmoid loss"
        )
    if section.reference not in REFERENCES:
        raise MinigptError(
            f"dpo.reference={section.reference!r}; choose one of {', '.join(REFERENCES)}"
        )


# ------------------------------------------------------------------------------------------- loss
def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, T, V) logits, (N, T) targets -> (N,) summed log-probabilities of each row's targets
    (IGNORE_INDEX positions add nothing), computed in fp32."""
    per_token = F.cross_entropy(
        logits.float().flatten(0, 1),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return -per_token.view_as(targets).sum(-1)


def preference_loss(
    policy: torch.Tensor, reference: torch.Tensor, section: DPOSection
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and (detached) chosen and rejected rewards, from (2B,) summed log-probs of
    the policy and the reference, the B chosen rows first."""
    chosen, rejected = (policy - reference).chunk(2)
    h, beta, eps = chosen - rejected, section.beta, section.label_smoothing
    if section.loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif section.loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (
            1 - 2 * eps
        )
    elif section.loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = F.relu(1 - beta * h)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def pair_metrics(
    policy: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> dict[str, torch.Tensor]:
    """METRICS summed over the pairs (the trainer divides by the step's pair count)."""
    logps_chosen, logps_rejected = policy.detach().chunk(2)
    values = (
        chosen_rewards,
        rejected_rewards,
        (chosen_rewards > rejected_rewards).float(),
        chosen_rewards - rejected_rewards,
        logps_chosen,
        logps_rejected,
    )
    return {name: v.sum() for name, v in zip(METRICS, values, strict=True)}


class PreferenceObjective:
    """The Trainer's objective for (inputs, targets[, reference log-probs]) pair batches from
    `collate_pairs`: one forward over the chosen and rejected rows together. Without stored
    reference log-probs in the batch, `reference` (a frozen model) computes them."""

    def __init__(self, section: DPOSection, reference: GPT | None = None):
        self.section, self.reference = section, reference

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return batch[0].size(0) // 2  # pairs

    def __call__(
        self, forward: Callable, batch: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets = batch[:2]
        logits, _ = forward(inputs)
        policy = sequence_logps(logits, targets)
        reference = batch[2] if len(batch) > 2 else self.reference_logps(inputs, targets)
        losses, chosen, rejected = preference_loss(policy, reference, self.section)
        return losses.mean(), pair_metrics(policy, chosen, rejected)

    @torch.no_grad()
    def reference_logps(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.reference is None:
            raise MinigptError("pairs without reference log-probs need a reference model")
        logits, _ = self.reference(inputs)
        return sequence_logps(logits, targets)


# -------------------------------------------------------------------------------------- reference
@torch.no_grad()
def reference_logps(
    model: GPT,
    pairs: Sequence[RenderedPair],
    micro_batch: int,
    pad_id: int,
    dtype: torch.dtype = torch.float32,
    dist: DistContext | None = None,
) -> torch.Tensor:
    """(N, 2) float32 summed log-probs of each pair's (chosen, rejected) reply under `model` (in
    eval mode). Rank r scores pairs r, r + world_size, ... in batches of `micro_batch`, as the
    held-out evaluation does, so that at step 0 held-out rewards are exactly 0; every rank gets
    the whole table."""
    dist = dist or DistContext()
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    mine = list(pairs)[dist.rank :: dist.world_size]
    values = []
    for start in range(0, len(mine), micro_batch):
        inputs, targets = collate_pairs(mine[start : start + micro_batch], pad_id)[:2]
        with autocast(device, dtype):
            logits, _ = model(inputs.to(device))
        values.append(sequence_logps(logits, targets.to(device)).view(2, -1).T)
    model.train(training)
    computed = torch.cat(values).cpu() if values else torch.empty(0, 2)
    table = torch.empty(len(pairs), 2)
    for rank, rows in enumerate(gather_objects(computed, dist)):
        table[rank :: dist.world_size] = rows
    return table


def stored_reference(
    path: Path,
    model: GPT,
    splits: dict[str, Sequence[RenderedPair]],
    config: RunConfig,
    dist: DistContext,
    reuse: bool,
) -> dict[str, torch.Tensor]:
    """Reference log-probs of each split's pairs: read from `path` when `reuse` (a resumed run)
    and it holds them for exactly these pairs, else computed with `model` and written there by
    rank 0."""
    key = fingerprint([pair for pairs in splits.values() for pair in pairs])
    tables = None
    if reuse and dist.is_main and path.is_file():
        with safe_open(str(path), "pt") as f:
            if f.metadata().get("fingerprint") != key:
                raise MinigptError(
                    f"{path} holds reference log-probs of other pairs than this run's data; "
                    "resume with the run's own config and data, or delete the file to recompute"
                )
            tables = {name: f.get_tensor(name) for name in splits}
    tables = broadcast_object(tables, dist)
    if tables is not None:
        if dist.is_main:
            print(f"reference log-probs read from {path}", flush=True)
        return tables
    start = time.perf_counter()
    dtype, pad_id = resolve_dtype(config.train.dtype, dist.device), get_tokenizer().eot_id
    tables = {
        name: reference_logps(model, pairs, config.train.micro_batch, pad_id, dtype, dist)
        for name, pairs in splits.items()
    }
    if dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tables, str(tmp), metadata={"fingerprint": key})
        os.replace(tmp, path)  # a crash mid-write leaves no half file to trust
        count = sum(map(len, splits.values()))
        print(
            f"reference log-probs of {count} pairs computed in "
            f"{time.perf_counter() - start:.1f} s -> {path}",
            flush=True,
        )
    return tables


def preference_eval_hook(
    pairs: Sequence[RenderedPair],
    objective: PreferenceObjective,
    config: RunConfig,
    dist: DistContext,
) -> EvalHook:
    """`val_loss` and the `eval_` METRICS over the held-out pairs every `train.eval_every`
    steps, each rank scoring every world_size-th pair, all summed across ranks."""
    mine = list(pairs)[dist.rank :: dist.world_size]
    micro_batch, pad_id = config.train.micro_batch, get_tokenizer().eot_id
    dtype = resolve_dtype(config.train.dtype, dist.device)

    def evaluate(step: int, model: GPT) -> dict:
        totals = torch.zeros(1 + len(METRICS), device=dist.device, dtype=torch.float64)
        for start in range(0, len(mine), micro_batch):
            batch = tuple(
                t.to(dist.device) for t in collate_pairs(mine[start : start + micro_batch], pad_id)
            )
            with autocast(dist.device, dtype):
                loss, sums = objective(model, batch)
            totals += torch.stack([loss * objective.count(batch), *sums.values()]).double()
        means = (all_reduce_sum(totals, dist) / len(pairs)).tolist()
        return {
            "val_loss": means[0],
            **{f"eval_{n}": v for n, v in zip(METRICS, means[1:], strict=True)},
        }

    return EvalHook("preferences", config.train.eval_every, evaluate)


# -------------------------------------------------------------------------------------------- run
def dpo(
    config: RunConfig,
    run_dir: str | Path,
    resume_from: str | Path | None = None,
    init: str | Path | None = None,
    dist: DistContext | None = None,
) -> Path:
    """Preference-tune `init` on `config.data`'s pairs into `run_dir`, continuing from
    `resume_from` (a run or checkpoint directory) when given. Returns the run directory."""
    check_dpo_section(config.dpo)
    run_dir = Path(run_dir)
    init = starting_model(init, run_dir, resume_from, "dpo")

    def setup(dist: DistContext) -> StageParts:
        cfg = config.train
        model = init_model(init, cfg.sequence_length).to(dist.device)
        torch.manual_seed(cfg.seed + dist.rank)  # different dropout masks per rank
        tokenizer = get_tokenizer()
        train, val = load_pairs(config, tokenizer, dist.is_main)
        reference = None
        if config.dpo.reference == "precomputed":
            path, resumed = run_dir / REFERENCE_FILE, resume_from is not None
            tables = stored_reference(
                path, model, {"train": train, "val": val}, config, dist, resumed
            )
            train, val = (
                [p._replace(reference=tuple(r)) for p, r in zip(pairs, rows.tolist(), strict=True)]
                for pairs, rows in ((train, tables["train"]), (val, tables["val"]))
            )
        else:
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        objective = PreferenceObjective(config.dpo, reference)
        batches = PairBatches(
            train,
            cfg.micro_batch,
            cfg.seed,
            tokenizer.eot_id,
            dist.rank,
            dist.world_size,
            batch_lengths(cfg),
        )
        hooks = [preference_eval_hook(val, objective, config, dist)] if val else []
        if config.eval.sample_tokens > 0:
            hooks.append(chat_hook(config, tokenizer))
        return StageParts(model, batches, hooks=hooks, objective=objective)

    # where the weights came from, recorded once: a resumed run's reference comes from it
    notes = {INIT_NOTE: f"{init}\n"} if resume_from is None else {}
    return run_training(config, run_dir, resume_from, dist, setup, notes)
