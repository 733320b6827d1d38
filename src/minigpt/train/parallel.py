"""How the model is spread over the processes: DDP (a full copy each) or FSDP2 (a 1/N share each),
and activation checkpointing under either.

`train.parallel = "fsdp"` calls `fully_shard` on every transformer block, then on the root, which
owns the embedding, the tied head (one parameter, so it stays tied), wpe, ln_f and any score head.
Each process then keeps 1/N of the weights, gradients and AdamW state; a block's weights are
all-gathered for its forward and backward and freed after, and gradients are reduce-scattered.
bf16 runs all-gather bf16 weights and reduce gradients in fp32; `train.cpu_offload` keeps the
shards in CPU memory (AdamW steps there). On one process there is nothing to shard: the model
trains as it is, and its checkpoints are full ones.

What the Trainer asks of this module: `check_parallel` (refuses what cannot work, before any
weight is loaded), `prepare_model` (checkpointing + sharding), `gradient_sync` (DDP's `no_sync`
or FSDP's deferred reduce-scatter on all but the last micro-step), `gathered` (the full weights
for forwards that ranks run in different numbers: sampling, rollouts, evals), and the state
dicts a checkpoint needs: `sharded_state` / `load_sharded` (torch.distributed.checkpoint, any
number of processes) and `load_full` (a full checkpoint into a sharded model).

FSDP, DTensor and torch.distributed.checkpoint are imported where they are used: together they
take seconds to import, which a DDP or one-process run should not wait for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minigpt import checkpoints
from minigpt.config import TrainSection
from minigpt.errors import MinigptError
from minigpt.train.optim import optimizer_name

PARALLEL_MODES = ("ddp", "fsdp")


def check_parallel(train: TrainSection, world_size: int, dtype: torch.dtype) -> None:
    """MinigptError naming the flag and the fix for a combination that cannot work, at start."""
    mode = train.parallel
    if mode not in PARALLEL_MODES:
        raise MinigptError(f"train.parallel={mode!r}; choose one of {', '.join(PARALLEL_MODES)}")
    if train.cpu_offload and (mode != "fsdp" or world_size < 2):
        raise MinigptError(
            "train.cpu_offload=true offloads FSDP's shards: it needs train.parallel=fsdp and at "
            f"least 2 processes (this run: parallel={mode}, {world_size} process(es))"
        )
    if mode != "fsdp":
        return
    if train.optimizer != "adamw":
        raise MinigptError(
            f"train.parallel=fsdp runs AdamW only: train.optimizer={train.optimizer} "
            "orthogonalises whole matrices, which FSDP splits across processes; set "
            "--train.optimizer=adamw, or use ddp"
        )
    if train.compile:
        raise MinigptError(
            "train.parallel=fsdp does not run with train.compile=true here (the sharded blocks' "
            "all-gathers break the static graphs); set --train.compile=false, or use ddp"
        )
    if dtype == torch.float16:
        raise MinigptError(
            "train.parallel=fsdp with float16 needs a gradient scaler that sees every shard, "
            "which the trainer's does not; use --train.dtype=bfloat16 (A100 and newer) or "
            "float32, or train.parallel=ddp"
        )


def is_sharded(train: TrainSection, world_size: int) -> bool:
    """Whether this run shards its model (FSDP on more than one process)."""
    return train.parallel == "fsdp" and world_size > 1


def prepare_model(model: nn.Module, train: TrainSection, world_size: int, dtype: torch.dtype):
    """Checkpoint and shard `model` in place, as the config says; returns it."""
    if train.activation_checkpointing:
        checkpoint_blocks(model)
    if is_sharded(train, world_size):
        shard_model(model, dtype, train.cpu_offload)
    return model


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass instead of keeping its activations
    (non-reentrant torch.utils.checkpoint, which replays the dropout masks). Forwards without
    gradients (evaluation, sampling with a KV cache) run the block as it is."""
    for block in model.transformer.h:
        block.forward = _recomputed(block.forward)


def _recomputed(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def shard_model(model: nn.Module, dtype: torch.dtype, cpu_offload: bool) -> None:
    """FSDP2 over the default process group: each block is one unit (gathered for its own
    forward and backward), the root the last, holding the tied embedding / head once."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options = {}
    if dtype == torch.bfloat16:  # bf16 all-gathers and matmuls; gradients reduced in fp32
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if cpu_offload:  # pinned memory only where there is a GPU to copy to
        device = next(model.parameters()).device
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for block in model.transformer.h:
        fully_shard(block, **options)
    fully_shard(model, **options)


def optimizer_device_type(train: TrainSection, device: torch.device) -> str:
    """Where AdamW steps: on the CPU under cpu_offload (the shards live there), else `device`."""
    return "cpu" if train.cpu_offload else device.type


def gradient_sync(forward: nn.Module, last: bool):
    """The context of one micro-step's forward and backward: gradients are reduced across
    processes only on the step's last one (DDP's `no_sync` before; FSDP keeps the unsharded
    gradients and reduce-scatters once, the memory cost of one more full gradient copy)."""
    if isinstance(forward, nn.parallel.DistributedDataParallel):
        return nullcontext() if last else forward.no_sync()
    if hasattr(forward, "set_requires_gradient_sync"):  # an FSDP2 module
        forward.set_requires_gradient_sync(last)
    return nullcontext()


def whole_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s total norm as a plain tensor (a replicated DTensor under FSDP)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every sharded unit's full weights on every rank, kept between forwards, so that ranks may
    run different numbers of forwards (sampling stops at different lengths; each rank scores its
    own examples) with no collective among them. Costs one copy of the weights in their
    training dtype. A no-op for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if isinstance(model, FSDPModule):
        # FSDP sets itself up at the root's first forward; the engine calls the blocks directly
        # (RL's first rollouts come before any training forward), and a block that runs first
        # claims to be a root, after which the real root's forward fails
        model._get_fsdp_state()._lazy_init()
    for unit in units:
        unit.unshard()
    blocks = [unit for unit in units if unit is not model]  # the root keeps its weights anyway
    for block in blocks:
        block.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for block in blocks:
            block.set_reshard_after_forward(True, recurse=False)
        for unit in units:
            unit.reshard()


# ---------------------------------------------------------------------------------- state dicts
def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """(the tensors of `checkpoints.save_checkpoint`'s shards: weights without the tied head
    and AdamW's state, keyed by parameter name; the optimizer's param groups, which name their
    parameters and go to the training state)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer)
    weights.pop(checkpoints.TIED_KEY, None)
    return {"model": weights, "optimizer": optim["state"]}, optim["param_groups"]


def load_sharded(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, param_groups: list
) -> None:
    """Load a sharded checkpoint into `model` and `optimizer`, sharded or not, on any number of
    processes: each reads the parts of the shards its own tensors cover."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    tensors, _ = sharded_state(model, optimizer)  # also creates AdamW's state to read into
    checkpoints.read_shards(directory, tensors)
    weights = tensors["model"]
    weights[checkpoints.TIED_KEY] = weights["transformer.wte.weight"]
    optim = {"state": tensors["optimizer"], "param_groups": param_groups}
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim)


def load_full(
    model: nn.Module, weights: dict, optimizer: torch.optim.Optimizer, optim_state: dict
) -> None:
    """Load a full checkpoint (one process or DDP) into a sharded model: each rank keeps its
    share of the weights and of AdamW's state, whose parameter numbers become names."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if optimizer_name(optim_state) != "adamw":
        raise MinigptError(
            "the checkpoint was trained with train.optimizer=muon, which FSDP does not run: "
            "resume it with --train.parallel=ddp"
        )
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=full)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    named = {
        "state": {order[i]: s for i, s in optim_state["state"].items()},
        "param_groups": [
            {**g, "params": [order[i] for i in g["params"]]} for g in optim_state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, named, options=full)
