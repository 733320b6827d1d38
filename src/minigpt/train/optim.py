"""Optimizers (AdamW, or Muon on the hidden matrices with AdamW on the rest), the warmup + cosine
learning rate, and batch arithmetic.

Every parameter group carries an `lr_scale`: the trainer sets each group's learning rate to the
schedule's value times its scale, so Muon's matrices (`train.muon_lr`) and AdamW's parameters
(`train.max_lr`) follow the same warmup and cosine, each at its own height.
"""

from __future__ import annotations

import inspect
import math

import torch

from minigpt.config import TrainSection
from minigpt.errors import MinigptError

OPTIMIZERS = ("adamw", "muon")

# where torch has a fused AdamW kernel
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def param_groups(model: torch.nn.Module, weight_decay: float, exclude=()) -> list[dict]:
    """Two AdamW groups: matrices and embeddings (dim >= 2) decay, biases and LayerNorm gains
    (dim < 2) do not, as in GPT-2 / nanoGPT. The tied embedding / head is one parameter, listed
    once. Parameters in `exclude` (Muon's) are left out."""
    skip = {id(p) for p in exclude}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def muon_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The hidden matrices Muon orthogonalises: the 2-D weights inside the transformer blocks
    (attention and MLP projections). The embeddings, the tied head and any scoring head are
    input / output layers, for which Muon's update is not meant (Jordan et al. 2024): AdamW's."""
    return [
        p
        for name, p in model.named_parameters()
        if p.requires_grad and p.dim() == 2 and name.startswith("transformer.h.")
    ]


def check_optimizer_settings(train: TrainSection) -> None:
    """Refuse optimizer settings that cannot train, naming the key and the fix."""
    if train.optimizer not in OPTIMIZERS:
        raise MinigptError(
            f"train.optimizer={train.optimizer!r} is not one of {', '.join(OPTIMIZERS)}; "
            "e.g. --train.optimizer=muon"
        )
    if train.optimizer != "muon":
        return
    if not hasattr(torch.optim, "Muon"):
        raise MinigptError(
            f"train.optimizer=muon needs torch.optim.Muon (PyTorch 2.9 or newer); this is "
            f"{torch.__version__}: upgrade torch or set --train.optimizer=adamw"
        )
    if not train.muon_lr > 0:
        raise MinigptError(f"train.muon_lr={train.muon_lr} must be > 0 (e.g. 0.02)")
    if not 0 <= train.muon_momentum < 1:
        raise MinigptError(
            f"train.muon_momentum={train.muon_momentum} must be in [0, 1) (e.g. 0.95)"
        )
    if train.muon_weight_decay < 0:
        raise MinigptError(f"train.muon_weight_decay={train.muon_weight_decay} must be >= 0")
    if not train.max_lr > 0:
        raise MinigptError(
            f"train.max_lr={train.max_lr} must be > 0 with Muon: it sets AdamW's height and, "
            "as muon_lr / max_lr, how the schedule scales Muon's"
        )


def build_adamw(
    groups: list[dict], lr: float, betas, eps: float, device_type: str
) -> torch.optim.AdamW:
    """AdamW with the fused kernel on GPUs (one launch for all parameters) and CPUs (one pass
    over each tensor instead of a dozen: 7x faster on the demo's 12M parameters)."""
    fused = (
        device_type in FUSED_ADAMW_DEVICES
        and "fused" in inspect.signature(torch.optim.AdamW).parameters
    )
    for group in groups:
        group.setdefault("lr_scale", 1.0)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def build_optimizer(model: torch.nn.Module, train: TrainSection, device_type: str):
    """The optimizer `train.optimizer` names over the model's trainable parameters: AdamW over
    `param_groups`, or `MuonWithAdamW`."""
    check_optimizer_settings(train)
    if train.optimizer == "adamw":
        groups = param_groups(model, train.weight_decay)
        return build_adamw(groups, train.max_lr, train.betas, train.eps, device_type)
    matrices = muon_matrices(model)
    muon_class = CPUMuon if device_type == "cpu" else torch.optim.Muon
    muon = muon_class(
        [{"params": matrices, "lr_scale": train.muon_lr / train.max_lr}],
        lr=train.muon_lr,
        momentum=train.muon_momentum,
        weight_decay=train.muon_weight_decay,
    )
    groups = param_groups(model, train.weight_decay, exclude=matrices)
    adamw = build_adamw(groups, train.max_lr, train.betas, train.eps, device_type)
    return MuonWithAdamW(muon, adamw)


class MuonWithAdamW:
    """Muon on the hidden matrices and AdamW on the rest, stepped as one optimizer: the trainer,
    the gradient scaler (fp16) and checkpoints see one `param_groups`, `step`, `zero_grad` and
    `state_dict`. With DDP every rank holds the same averaged gradients, so every rank takes the
    same step."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    def step(self, closure=None) -> None:
        if closure is not None:
            raise MinigptError("MuonWithAdamW.step takes no closure")
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def optimizer_name(state: dict) -> str:
    """Which optimizer wrote a checkpoint's optimizer state."""
    return "muon" if set(state) == {"muon", "adamw"} else "adamw"


def load_optimizer_state(optimizer, state: dict, train: TrainSection) -> None:
    """Continue from a checkpoint's optimizer state; refuses another optimizer's state (its
    moments would be read as the wrong quantities), and re-applies this config's `lr_scale`s
    (torch restores the saved group settings)."""
    saved = optimizer_name(state)
    if saved != train.optimizer:
        raise MinigptError(
            f"the checkpoint was trained with train.optimizer={saved}, this run asks for "
            f"{train.optimizer}: resume with --train.optimizer={saved}, or start a new run "
            "from its weights (`minigpt sft --init`, or a fresh run directory)"
        )
    optimizer.load_state_dict(state)
    if train.optimizer == "muon":
        for group in optimizer.muon.param_groups:
            group["lr_scale"] = train.muon_lr / train.max_lr


class CPUMuon(torch.optim.Muon if hasattr(torch.optim, "Muon") else torch.optim.Optimizer):
    """torch's Muon with its Newton-Schulz iteration in float32, for CPUs. torch runs the
    iteration in bfloat16, which GPUs multiply at full speed but an AVX2 CPU emulates: 19x
    slower, 6.2 s of Muon per demo step against 0.16 s in float32 on a 2-core AVX2 machine. CPUs
    with AMX / AVX512-BF16 run bf16 about twice as fast as float32, but there Muon is a twentieth
    of a demo step either way, and float32 is the more exact: updates do not hinge on bf16
    rounding, so accumulated micro-batches, DDP ranks and one big batch take the same step to
    float32 precision on every CPU. Momentum, Nesterov, weight decay and the shape-dependent
    learning rate are torch's."""

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim._muon import _adjust_lr  # torch's own rule, as Muon.step applies it

        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            lr, momentum = group["lr"], group["momentum"]
            for param, grad, buffer in zip(params, grads, buffers, strict=True):
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = orthogonalize_float32(
                    update, group["ns_coefficients"], group["ns_steps"], group["eps"]
                )
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))


def orthogonalize_float32(
    grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration (same coefficients, same steps, same
    normalisation), in float32: about U V^T of grad = U S V^T, singular values near 1."""
    a, b, c = coefficients
    x = grad.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for the optimizer step with 0-based index `step`.

    Linear warmup reaches `max_lr` at step `warmup_steps - 1`; then a cosine decays it to `min_lr`
    at `max_steps`, and it stays there if training runs longer (build-nanogpt's schedule).
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def grad_accum_steps(
    total_batch_tokens: int, micro_batch: int, seq_len: int, world_size: int
) -> int:
    """Micro-steps per optimizer step so that all processes together see `total_batch_tokens`."""
    per_micro_step = micro_batch * seq_len * world_size
    if total_batch_tokens <= 0 or total_batch_tokens % per_micro_step:
        lower = max(1, total_batch_tokens // per_micro_step) * per_micro_step
        raise MinigptError(
            f"train.total_batch_tokens={total_batch_tokens:,} must be a positive multiple of "
            f"micro_batch ({micro_batch}) x sequence_length ({seq_len}) x processes "
            f"({world_size}) = {per_micro_step:,}; e.g. set --train.total_batch_tokens={lower} "
            "or change train.micro_batch"
        )
    return total_batch_tokens // per_micro_step
