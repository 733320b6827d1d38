"""Read the next optimizer step's micro-batches on a background thread while this step runs.

The batch source (token windows from shards, padded conversations) works on the CPU: gathering
windows, converting to int64, counting the targets that count, and pinning the memory for an
asynchronous copy to the GPU. Done on a helper thread one step ahead, the device never waits for
it. `state_dict()` is the source's position after the batches handed out so far, not after the
ones read ahead, so a checkpoint taken between steps resumes exactly. A source whose batches depend
on the weights (RL rollouts, sampled from the policy as it is after the last step) says
`read_ahead = False` and is read on the caller's thread when the step asks; one with a
`metrics()` method (`{name: number}` about the batches just read, already reduced across ranks)
has them logged with the step.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch


@dataclass
class StepBatches:
    """One optimizer step's micro-batches and, for each, its number of counted units (target
    tokens for the language-model loss, pairs for DPO)."""

    micro_batches: list[tuple[torch.Tensor, ...]]
    counts: list[int]
    metrics: dict[str, float] = field(default_factory=dict)  # the source's, if it has any


class StepPrefetcher:
    """Wraps a `BatchSource`: `next_step()` returns `count` micro-batches, already read, each
    with its `count_units(batch)` (the objective's count, on CPU tensors: no device sync)."""

    def __init__(
        self,
        source,
        count: int,
        count_units: Callable[[tuple[torch.Tensor, ...]], int],
        pin_memory: bool = False,
    ):
        self.source, self.count, self.pin_memory = source, count, pin_memory
        self.count_units = count_units
        # sources without ignored targets (pre-training windows) need no counting, nor the
        # trainer an all-reduce of counts: every target counts
        self.ignores_targets = getattr(source, "ignores_targets", True)
        self.read_ahead = getattr(source, "read_ahead", True)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="minigpt-prefetch")
        self._pending: Future | None = None
        self._state = source.state_dict()

    def _read(self) -> tuple[StepBatches, dict]:
        batches = [self.source.next_batch() for _ in range(self.count)]
        if self.ignores_targets:
            counts = [self.count_units(batch) for batch in batches]
        else:
            counts = [batch[1].numel() for batch in batches]
        if self.pin_memory:
            batches = [tuple(t.pin_memory() for t in batch) for batch in batches]
        metrics = self.source.metrics() if hasattr(self.source, "metrics") else {}
        return StepBatches(batches, counts, metrics), self.source.state_dict()

    def next_step(self) -> StepBatches:
        if not self.read_ahead:
            step, self._state = self._read()
            return step
        future = self._pending or self._pool.submit(self._read)
        step, self._state = future.result()
        self._pending = self._pool.submit(self._read)
        return step

    def _cancel(self) -> None:
        if self._pending is not None:
            self._pending.result()  # let the read finish, then forget it
            self._pending = None

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self._cancel()
        self.source.load_state_dict(state)
        self._state = self.source.state_dict()

    def close(self) -> None:
        """Wait for a read-ahead in flight (the position stays where the steps left it)."""
        self._cancel()
