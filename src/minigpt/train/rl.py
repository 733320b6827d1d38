"""Online RL (GRPO, Shao et al. 2024; RLOO, Ahmadian et al. 2024) on the shared Trainer.

`rl(config, run_dir, resume_from, init)` is what `minigpt rl` runs, on one process or on every
process that torchrun starts. Each batch of rollouts: every rank takes its share of the prompts
(`data.*`, see minigpt.data.prompts), samples `rl.num_generations` replies to each with the
engine (KV cache, continuous batching, the policy's current weights; seeded by the prompt's
place in the stream, so the replies do not depend on the number of processes), scores them, and
turns the group's rewards into advantages:
    grpo   A_i = (r_i - mean(r)) / (std(r) + 1e-4)        (the group's sample std)
    rloo   A_i = r_i - mean_{j != i} r_j = G / (G - 1) (r_i - mean(r))
The batch is then trained on for `rl.num_iterations` optimizer steps. Per completion token, with
the ratio rho = pi / pi_old (pi_old: the policy that sampled; exactly 1 on its first update) and
the reference pi_ref = the frozen starting weights (its log-probs computed once per rollout batch):
    loss = -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta (pi_ref/pi - log(pi_ref/pi) - 1)
the last term being the k3 estimate of KL(pi || pi_ref) (Schulman 2020); the loss is the mean
over every completion token of the step (`rl.epsilon`, `rl.beta`).

Rewards: `rl.reward_model` (a `minigpt rm` run, scoring prompt + reply) and/or `rl.reward`
functions with TRL's signature `f(prompts, completions, **kwargs) -> list[float]`, weighted by
`rl.reward_weights` and summed. A function is called once per prompt with its G completions
(the decoded replies without their stop token); kwargs hold `completion_ids`, `finish_reasons`
("stop" or "length") and each extra field of the prompt's record, one entry per completion.

Metrics, named as TRL's GRPOTrainer names them: `reward`, `reward_std` (mean of the groups'
std), `rewards/<name>/mean` and `/std`, `frac_reward_zero_std`, `completions/mean_length`,
`completions/clipped_ratio` (share that hit the token limit) from the rollouts; `kl`, `entropy`,
`clip_ratio/region_mean`, `clip_ratio/low_mean`, `clip_ratio/high_mean` per completion token
from the loss. Resuming is exact from any step: a checkpoint in the middle of a rollout batch
(`rl.num_iterations` > 1) carries the batch's remaining micro-batches.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from minigpt.checkpoints import load_model
from minigpt.config import RLSection, RunConfig
from minigpt.data.chat import collate_sft
from minigpt.data.prompts import Prompt, load_prompts, render_prompts
from minigpt.device import autocast, resolve_dtype
from minigpt.engine import Engine, Sampling
from minigpt.errors import MinigptError
from minigpt.model import GPT, IGNORE_INDEX
from minigpt.reward import RewardModel, collate_sequences
from minigpt.tokenizer import Tokenizer, get_tokenizer
from minigpt.train.distributed import DistContext, all_reduce_sum
from minigpt.train.finetune import (
    INIT_NOTE,
    ConversationBatches,
    batch_lengths,
    chat_hook,
    init_model,
    split_conversations,
    starting_model,
)
from minigpt.train.optim import grad_accum_steps
from minigpt.train.run import StageParts, run_training
from minigpt.train.trainer import EvalHook

LOSS_TYPES = ("grpo", "rloo")
GRPO_STD_EPS = 1e-4  # TRL's: a group with equal rewards gets advantage 0, not 0/0


class RewardError(MinigptError, ValueError):
    """A reward function that cannot be used, or a reward model that does not fit the policy."""


def check_rl_section(section: RLSection) -> None:
    """Raise MinigptError naming the key unless the [rl] settings make sense together."""
    if section.loss_type not in LOSS_TYPES:
        raise MinigptError(f"rl.loss_type={section.loss_type!r}; choose one of grpo, rloo")
    if section.num_generations < 2:
        raise MinigptError(
            f"rl.num_generations={section.num_generations}: a group needs at least 2 replies "
            "to compare"
        )
    for key, value, ok in (
        ("max_completion_tokens", section.max_completion_tokens, section.max_completion_tokens > 0),
        ("num_iterations", section.num_iterations, section.num_iterations >= 1),
        ("epsilon", section.epsilon, section.epsilon > 0),
        ("beta", section.beta, section.beta >= 0),
        ("temperature", section.temperature, section.temperature > 0),
        ("top_k", section.top_k, section.top_k >= 0),
    ):
        if not ok:
            raise MinigptError(f"rl.{key}={value} is out of range")
    if not (section.reward_model or section.reward):
        raise MinigptError("no reward: set rl.reward_model (a minigpt rm run) and/or rl.reward")
    count = bool(section.reward_model) + len(section.reward)
    if section.reward_weights and len(section.reward_weights) != count:
        raise MinigptError(
            f"rl.reward_weights has {len(section.reward_weights)} weights for {count} rewards "
            "(the reward model first, then rl.reward in order)"
        )


# ------------------------------------------------------------------------------------ advantages
def group_advantages(rewards: torch.Tensor, loss_type: str) -> torch.Tensor:
    """(P, G) rewards of P groups -> (P, G) advantages (see the module docstring)."""
    mean = rewards.mean(dim=1, keepdim=True)
    if loss_type == "grpo":
        return (rewards - mean) / (rewards.std(dim=1, keepdim=True) + GRPO_STD_EPS)
    group = rewards.size(1)
    return (rewards - mean) * group / (group - 1)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V) logits, (B, T) targets -> (B, T) fp32 log-probs of the targets and entropies of
    the distributions (0 where the target is IGNORE_INDEX)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return picked * mask, entropy * mask


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate with the k3 KL term, summed over the completion tokens (`mask`),
    and the sums of `kl` and the `clip_ratio/*` shares over those tokens."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(-1)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)
    sums = {}
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        sums["kl"] = (kl.detach() * mask).sum()
    low = ((ratio < 1 - epsilon) & (adv < 0)).float() * mask
    high = ((ratio > 1 + epsilon) & (adv > 0)).float() * mask
    sums["clip_ratio/low_mean"] = low.sum()
    sums["clip_ratio/high_mean"] = high.sum()
    sums["clip_ratio/region_mean"] = (low + high).sum()
    return (per_token * mask).sum(), sums


class PolicyObjective:
    """The Trainer's objective for rollout micro-batches (inputs, targets, advantages, reference
    log-probs, old log-probs; either log-prob tensor empty when not needed)."""

    def __init__(self, section: RLSection):
        self.section = section

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())  # completion tokens

    def __call__(
        self, forward: Callable, batch: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets, advantages, ref_logps, old_logps = batch
        logits, _ = forward(inputs)
        logps, entropy = token_logps(logits, targets)
        mask = (targets != IGNORE_INDEX).float()
        old = old_logps if old_logps.numel() else logps.detach()
        ref = ref_logps if ref_logps.numel() else None
        total, sums = policy_loss(
            logps, old, ref, advantages, mask, self.section.epsilon, self.section.beta
        )
        sums["entropy"] = entropy.detach().sum()
        return total / mask.sum().clamp(min=1), sums


# --------------------------------------------------------------------------------------- rewards
def load_reward_function(spec: str) -> tuple[str, Callable]:
    """(name, callable) of "module:function" or "path/to/file.py:function"."""
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise RewardError(f"rl.reward {spec!r}: write it as module:function or file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise RewardError(f"rl.reward {spec!r}: no such file {path}")
            loader_spec = importlib.util.spec_from_file_location(
                f"minigpt_reward_{path.stem}", path
            )
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[loader_spec.name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except RewardError:
        raise
    except Exception as e:  # anything the user's module raises at import
        raise RewardError(f"rl.reward {spec!r}: cannot import {module_name} ({e!r})") from e
    function = getattr(module, function_name, None)
    if not callable(function):
        raise RewardError(f"rl.reward {spec!r}: {module_name} has no function {function_name}")
    return function_name, function


def call_reward(
    name: str, function: Callable, prompt_index: int, prompts: list, completions: list[str],
    kwargs: dict,
) -> list[float]:  # fmt: skip
    """`function`'s rewards of one prompt's completions, or a RewardError naming the function
    and the prompt when it raises or returns the wrong count or a value that is not finite."""
    where = f"reward function {name} on prompt {prompt_index}"
    try:
        values = function(prompts, completions, **kwargs)
    except Exception as e:
        raise RewardError(f"{where} raised {e!r}") from e
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise RewardError(f"{where} returned {values!r:.80}, not a list of numbers") from e
    if len(values) != len(completions):
        raise RewardError(
            f"{where} returned {len(values)} values for {len(completions)} completions"
        )
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise RewardError(f"{where} returned a non-finite value ({bad[0]})")
    return values


def load_reward_model(path: str, policy: GPT, device: torch.device) -> RewardModel:
    """The frozen reward model at `path`, refused unless it reads the policy's token ids."""
    try:
        model = load_model(path, device=device, head="reward")
    except MinigptError as e:
        raise RewardError(f"rl.reward_model: {e}") from e
    if model.config.vocab_size != policy.config.vocab_size:
        raise RewardError(
            f"rl.reward_model {path} has a vocabulary of {model.config.vocab_size} ids, the "
            f"policy {policy.config.vocab_size}: train the reward model from the policy's "
            "family (minigpt rm --init the SFT run)"
        )
    return model.eval().requires_grad_(False)


# -------------------------------------------------------------------------------------- rollouts
class RolloutBatches(ConversationBatches):
    """Micro-batches of scored rollouts, sampled from the policy when a batch runs out.

    The prompts are the seeded, resumable, rank-sliced stream of ConversationBatches: a rollout
    batch takes `prompts_per_rank * world_size` prompts and rank r keeps the r-th slice. Each
    step reads `accum` micro-batches of `micro_batch` completions; a rollout batch holds
    `num_iterations` steps' worth. Read on the training thread, between steps (`read_ahead`
    False): it samples from the weights as the last step left them."""

    read_ahead = False

    def __init__(
        self,
        prompts: Sequence[Prompt],
        prompt_ids: Sequence[list[int]],
        policy: GPT,
        reference: GPT | None,
        reward_model: RewardModel | None,
        functions: Sequence[tuple[str, Callable]],
        config: RunConfig,
        dist: DistContext,
        tokenizer: Tokenizer,
    ):
        cfg, section = config.train, config.rl
        self.accum = grad_accum_steps(
            cfg.total_batch_tokens, cfg.micro_batch, cfg.sequence_length, dist.world_size
        )
        completions = self.accum * cfg.micro_batch
        if completions % section.num_generations:
            raise MinigptError(
                f"each step trains on {completions} completions per process (micro_batch x "
                f"accumulation), not a multiple of rl.num_generations={section.num_generations}; "
                "change train.micro_batch or rl.num_generations"
            )
        super().__init__(
            list(range(len(prompts))), completions // section.num_generations, cfg.seed,
            tokenizer.eot_id, dist.rank, dist.world_size, batch_lengths(cfg),
        )  # fmt: skip
        self.prompts, self.prompt_ids = prompts, prompt_ids
        self.policy, self.reference, self.reward_model = policy, reference, reward_model
        self.functions, self.section, self.cfg, self.dist = functions, section, cfg, dist
        self.tokenizer = tokenizer
        self.stop_ids = {tokenizer.eot_id, tokenizer.user_id, tokenizer.assistant_id}
        self.stop_ids.add(tokenizer.end_id)
        names = (["reward_model"] if reward_model is not None else []) + [n for n, _ in functions]
        self.reward_names = names
        self.weights = torch.tensor(section.reward_weights or [1.0] * len(names))
        self.dtype = resolve_dtype(cfg.dtype, dist.device)
        self.rollouts = 0  # rollout batches sampled so far
        self._queue: list[tuple[torch.Tensor, ...]] = []
        self._metrics: dict[str, float] = {}
        self.samples: list[str] = []  # the last batch's first replies, for the eval hook

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        if not self._queue:
            self._queue = self.rollout() * self.section.num_iterations
        return self._queue.pop(0)

    def metrics(self) -> dict[str, float]:
        return self._metrics

    def state_dict(self) -> dict:
        # the rollout batch's micro-batches not yet trained on (with their sampling policy's
        # log-probs), so a checkpoint in mid-batch resumes on them as an unbroken run would
        return {
            **super().state_dict(),
            "rollouts": self.rollouts,
            "queue": list(self._queue),
            "metrics": dict(self._metrics),
            "samples": list(self.samples),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rollouts = state["rollouts"]
        self._queue = [tuple(batch) for batch in state["queue"]]
        self._metrics, self.samples = dict(state["metrics"]), list(state["samples"])

    # ------------------------------------------------------------------ one batch of rollouts
    def rollout(self) -> list[tuple[torch.Tensor, ...]]:
        """Sample, score and collate one rollout batch: `accum` micro-batches."""
        per_rank, G = self.micro_batch, self.section.num_generations
        picked = [self._take() for _ in range(self.world_size * per_rank)]
        first = self.rank * per_rank
        mine = picked[first : first + per_rank]
        # the seed of a prompt is its place in the whole stream: the same on any process count
        seed = self.cfg.seed + (self.rollouts * self.world_size * per_rank + first)
        self.rollouts += 1
        prompt_ids = [self.prompt_ids[i] for i in mine]
        completions = self.sample(prompt_ids, seed)
        rewards = self.score(mine, prompt_ids, completions)  # (P, G, R)
        total = (rewards * self.weights).sum(-1)
        advantages = group_advantages(total, self.section.loss_type).flatten()
        self._metrics = self.rollout_metrics(rewards, total, completions)
        self.samples = [
            f"{self.tokenizer.decode(prompt_ids[0])} -> {self.tokenizer.decode(c)!r} "
            f"(reward {r:.3f})"
            for c, r in zip(completions[:G], total[0].tolist(), strict=True)
        ]
        rows = [
            (prompt_ids[n // G] + c, [0] * len(prompt_ids[n // G]) + [1] * len(c))
            for n, c in enumerate(completions)
        ]
        size = self.cfg.micro_batch
        return [
            self.collate_rollouts(rows[s : s + size], advantages[s : s + size])
            for s in range(0, len(rows), size)
        ]

    def sample(self, prompt_ids: list[list[int]], seed: int) -> list[list[int]]:
        """G completions per prompt (prompt-major), stop token included when there is one."""
        training = self.policy.training
        engine = Engine(self.policy, self.tokenizer.n_vocab)
        sampling = Sampling(self.section.temperature, self.section.top_k or None)
        with autocast(self.dist.device, self.dtype):
            completions = engine.generate(
                prompt_ids,
                self.section.max_completion_tokens,
                sampling,
                num_samples=self.section.num_generations,
                stop_ids=self.stop_ids,
                seed=seed,
            )
        self.policy.train(training)
        return completions

    def score(
        self, mine: list[int], prompt_ids: list[list[int]], completions: list[list[int]]
    ) -> torch.Tensor:
        """(P, G, R) rewards: the reward model's, then each function's."""
        G, columns = self.section.num_generations, []
        if self.reward_model is not None:
            sequences = [prompt_ids[n // G] + c for n, c in enumerate(completions)]
            ids, lengths = collate_sequences(sequences, self.pad_id)
            device = self.dist.device
            with torch.no_grad(), autocast(device, self.dtype):
                scores = self.reward_model(ids.to(device), lengths.to(device))
            columns.append(scores.float().cpu().view(-1, G))
        for name, function in self.functions:
            values = []
            for p, index in enumerate(mine):
                group = completions[p * G : (p + 1) * G]
                stopped = [bool(c) and c[-1] in self.stop_ids for c in group]
                texts = [
                    self.tokenizer.decode(c[:-1] if s else c)
                    for c, s in zip(group, stopped, strict=True)
                ]
                record = self.prompts[index]
                kwargs = {
                    "completion_ids": group,
                    "finish_reasons": ["stop" if s else "length" for s in stopped],
                    **{k: [v] * G for k, v in record.extra.items()},
                }
                values.append(
                    call_reward(name, function, index, [record.prompt] * G, texts, kwargs)
                )
            columns.append(torch.tensor(values))
        return torch.stack(columns, dim=-1)

    def collate_rollouts(
        self, rows: list[tuple[list[int], list[int]]], advantages: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """A micro-batch, with the log-probs of the reference (when beta > 0) and of the
        sampling policy (when it is trained on more than once) computed now."""
        inputs, targets = collate_sft(rows, self.pad_id, self.buckets)
        ref = old = torch.empty(0)
        if self.reference is not None:
            ref = self.logps(self.reference, inputs, targets)
        if self.section.num_iterations > 1:
            old = self.logps(self.policy, inputs, targets)
        return inputs, targets, advantages.float(), ref, old

    @torch.no_grad()
    def logps(self, model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        device, training = self.dist.device, model.training
        model.eval()
        with autocast(device, self.dtype):
            logits, _ = model(inputs.to(device))
        model.train(training)
        return token_logps(logits, targets.to(device))[0].cpu()

    def rollout_metrics(
        self, rewards: torch.Tensor, total: torch.Tensor, completions: list[list[int]]
    ) -> dict[str, float]:
        """The rollout numbers of every rank together (one all-reduce)."""
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float64)
        clipped = [not (c and c[-1] in self.stop_ids) for c in completions]
        std = total.std(dim=1)
        per_reward = rewards.double().flatten(0, 1)  # (P*G, R)
        sums = torch.cat([
            torch.tensor([
                total.sum(), total.numel(), std.sum(), std.numel(), (std == 0).sum(),
                lengths.sum(), sum(clipped),
            ], dtype=torch.float64),
            per_reward.sum(0), (per_reward**2).sum(0),
        ])  # fmt: skip
        sums = all_reduce_sum(sums.to(self.dist.device), self.dist).cpu().tolist()
        total_sum, n, std_sum, groups, zero_std, length_sum, clipped_sum = sums[:7]
        R = rewards.size(-1)
        means = [s / n for s in sums[7 : 7 + R]]
        squares = [s / n for s in sums[7 + R :]]
        metrics = {
            "reward": total_sum / n,
            "reward_std": std_sum / groups,
            "frac_reward_zero_std": zero_std / groups,
            "completions/mean_length": length_sum / n,
            "completions/clipped_ratio": clipped_sum / n,
        }
        for name, mean, square in zip(self.reward_names, means, squares, strict=True):
            metrics[f"rewards/{name}/mean"] = mean
            metrics[f"rewards/{name}/std"] = math.sqrt(max(0.0, square - mean**2))
        return metrics


def load_prompt_data(
    config: RunConfig, tokenizer: Tokenizer, verbose: bool
) -> tuple[list[Prompt], list[list[int]]]:
    """The training prompts (the held-out share of `data.val_fraction` is left out) that leave
    room for `rl.max_completion_tokens` within `train.sequence_length`, and their ids."""
    data = config.data
    if not data.source:
        raise MinigptError("data.source is not set: prompts, pairs or conversations to ask")
    loaded = load_prompts(
        data.source, data.format or None, split=data.split, limit=data.limit or None
    )
    train, _ = split_conversations(loaded.prompts, data.val_fraction)
    # prompt + completion within sequence_length: the reward model reads the whole sequence
    budget = config.train.sequence_length - config.rl.max_completion_tokens
    prompts, ids = render_prompts(train, tokenizer, budget)
    if verbose:
        print(
            f"{loaded.summary()}; {len(prompts)} training prompts within {budget} tokens "
            f"({len(train) - len(prompts)} longer ones left out)",
            flush=True,
        )
    if not prompts:
        raise MinigptError(
            f"no prompt fits in {budget} tokens (train.sequence_length - "
            "rl.max_completion_tokens); raise train.sequence_length"
        )
    return prompts, ids


def rollout_hook(batches: RolloutBatches, every: int) -> EvalHook:
    """The last rollout batch's replies to its first prompt, with their rewards."""

    def samples(step: int, model: GPT) -> dict:
        return {"completions": batches.samples} if batches.samples else {}

    return EvalHook("rollouts", every, samples)


def rl(
    config: RunConfig,
    run_dir: str | Path,
    resume_from: str | Path | None = None,
    init: str | Path | None = None,
    dist: DistContext | None = None,
) -> Path:
    """Optimise `init` online against `config.rl`'s rewards into `run_dir`, continuing from
    `resume_from` (a run or checkpoint directory) when given. Returns the run directory."""
    check_rl_section(config.rl)
    functions = [load_reward_function(spec) for spec in config.rl.reward]  # fail early
    run_dir = Path(run_dir)
    init = starting_model(init, run_dir, resume_from, "rl")

    def setup(dist: DistContext) -> StageParts:
        cfg, section = config.train, config.rl
        model = init_model(init, cfg.sequence_length).to(dist.device)
        torch.manual_seed(cfg.seed + dist.rank)  # different dropout masks per rank
        tokenizer = get_tokenizer()
        reward_model = None
        if section.reward_model:
            reward_model = load_reward_model(section.reward_model, model, dist.device)
        reference = None
        if section.beta > 0:
            reference = init_model(init, cfg.sequence_length).to(dist.device)
            reference = reference.eval().requires_grad_(False)
        prompts, ids = load_prompt_data(config, tokenizer, dist.is_main)
        batches = RolloutBatches(
            prompts, ids, model, reference, reward_model, functions, config, dist, tokenizer
        )
        hooks = [rollout_hook(batches, cfg.eval_every)]
        if config.eval.sample_tokens > 0:
            hooks.append(chat_hook(config, tokenizer))
        return StageParts(model, batches, hooks=hooks, objective=PolicyObjective(section))

    notes = {INIT_NOTE: f"{init}\n"} if resume_from is None else {}
    return run_training(config, run_dir, resume_from, dist, setup, notes)
