"""Process-group setup for data-parallel training under torchrun.

torchrun (single- or multi-node) sets RANK, LOCAL_RANK and WORLD_SIZE for every process; without
them we run as the only process. GPUs talk over NCCL, CPUs over gloo. Helpers here are no-ops in
a single process, so the trainer reads the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from minigpt.device import resolve_device
from minigpt.errors import MinigptError


@dataclass
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, checkpoints and the run's config."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def collective_timeout(minutes: float) -> timedelta:
    """`train.dist_timeout_minutes` as the process group's timeout: how long any rank waits in a
    collective for the others before the run fails."""
    if minutes > 0:  # also refuses nan
        try:
            return timedelta(minutes=minutes)
        except OverflowError:  # inf, or past timedelta's 999,999,999 days
            pass
    raise MinigptError(
        f"train.dist_timeout_minutes={minutes} must be a positive number of minutes; the "
        "default, 60, covers rank 0 writing a large checkpoint while the other ranks wait"
    )


def init_distributed(device_name: str, timeout_minutes: float) -> DistContext:
    """Join the torchrun process group if there is one, with `timeout_minutes` for every
    collective; pick this process's device."""
    timeout = collective_timeout(timeout_minutes)  # refused alone too, not only under torchrun
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank, launched="LOCAL_RANK" in os.environ)
    if device.type == "cuda":  # also alone: kernels and NCCL would otherwise start on cuda:0
        torch.cuda.set_device(device)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        # device_id binds NCCL to this GPU at once (no guessing, no stray context on cuda:0)
        dist.init_process_group(
            backend=backend, timeout=timeout, device_id=device if backend == "nccl" else None
        )
    return DistContext(rank, local_rank, world_size, device)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum `tensor` over all processes, in place; returns it."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Element-wise max of `tensor` over all processes, in place; returns it."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier(ctx: DistContext) -> None:
    """Every rank waits here for the others (no-op on one process)."""
    if ctx.distributed:
        dist.barrier()


def gather_objects(obj: object, ctx: DistContext) -> list:
    """Every process's `obj`, in rank order (on every rank)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, ctx: DistContext) -> object:
    """Rank 0's `obj` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
