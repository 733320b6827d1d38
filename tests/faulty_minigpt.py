"""`python -m minigpt` with one fault injected, for the tests that prove a run recovers from it.

    python tests/faulty_minigpt.py FAULT VERB ARGS...
    torchrun ... tests/faulty_minigpt.py FAULT train ARGS...
    python tests/faulty_minigpt.py drill:SEED:KILLS:EVENTS VERB ARGS...

FAULT is one of
    step:N        SIGKILL once step N is done (logged, evaluated, checkpointed if due), before
                  step N+1 starts
    checkpoint:N  SIGKILL halfway through writing step N's checkpoint: its files are written,
                  not yet renamed into place
    sigterm:N     SIGTERM to itself during step N (a preemption notice: the step finishes)
    event:N       SIGKILL at the Nth event of this process, counting the start of each step
                  and the moments before and after each write, fsync and rename of checkpoint
                  writing (the crash drill picks N at random)
Under torchrun the fault fires in the first attempt only, so that the restart can recover.

drill:SEED:KILLS:EVENTS is the crash drill: KILLS processes in a row, each forked from this one
(imports done once, so a restart costs no start-up) and SIGKILLed at event N, N drawn from
1..EVENTS by random.Random(SEED); then one last run to the end. It prints the events and exits
with the last run's status, or 1 if a process was not killed as planned.
The faults are patched in from here, so that the library carries no test hooks.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from minigpt import checkpoints
from minigpt.cli import main
from minigpt.train.trainer import Trainer


def _kill(signum: int) -> None:
    os.kill(os.getpid(), signum)


def _die_before_publishing(step: int) -> None:
    """SIGKILL at the rename that would put step `step`'s checkpoint in place."""
    replace, name = os.replace, checkpoints.checkpoint_name(step)

    def replace_or_die(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            _kill(signal.SIGKILL)
        return replace(src, dst, *args, **kwargs)

    os.replace = replace_or_die


def _signal_at_step(step: int, signum: int, before: bool) -> None:
    """`signum` to this process just before step `step` runs (`before`), or just after it: as
    the next step starts, once the loop has logged, evaluated and checkpointed `step`."""
    train_step = Trainer.train_step

    def faulty_train_step(self: Trainer) -> dict:
        if self.step == (step - 1 if before else step):  # self.step: the steps already done
            _kill(signum)
        return train_step(self)

    Trainer.train_step = faulty_train_step


def _die_at_event(n: int) -> None:
    """SIGKILL at the `n`th event: a step starting, or any checkpoint-writing call starting or
    returning (so within a checkpoint between any two of its files, and around `latest`)."""
    count = 0

    def tick() -> None:
        nonlocal count
        count += 1
        if count == n:
            _kill(signal.SIGKILL)

    def counted(call):
        def wrapper(*args, **kwargs):
            tick()
            result = call(*args, **kwargs)
            tick()
            return result

        return wrapper

    for name in ("save_file", "write_checksums", "_fsync_tree"):
        setattr(checkpoints, name, counted(getattr(checkpoints, name)))
    checkpoints.torch.save = counted(checkpoints.torch.save)
    os.replace = counted(os.replace)
    train_step = Trainer.train_step

    def counted_train_step(self: Trainer) -> dict:
        tick()
        return train_step(self)

    Trainer.train_step = counted_train_step


def install(fault: str) -> None:
    event, _, step = fault.partition(":")
    if event not in ("step", "checkpoint", "sigterm", "event") or not step.isdigit():
        raise SystemExit(f"faulty_minigpt: unknown fault {fault!r}")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return  # a torchrun restart: this attempt is the recovery
    if event == "event":
        _die_at_event(int(step))
    elif event == "checkpoint":
        _die_before_publishing(int(step))
    elif event == "step":
        _signal_at_step(int(step), signal.SIGKILL, before=False)
    else:  # the handler runs at once; the trainer acts on it after the step
        _signal_at_step(int(step), signal.SIGTERM, before=True)


def drill(seed: int, kills: int, events: int, argv: list[str]) -> int:
    import random

    import torch._dynamo  # noqa: F401 (the optimizer imports it: once here, not per process)

    rng = random.Random(seed)
    planned = [rng.randint(1, events) for _ in range(kills)]
    for event in planned:
        pid = os.fork()
        if pid == 0:  # the child: one training process, killed at `event`
            _die_at_event(event)
            os._exit(main(argv))
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != -signal.SIGKILL:
            print(f"faulty_minigpt: not killed at event {event}: status {status}", flush=True)
            return 1
    print(f"killed at events {planned}", flush=True)
    return main(argv)


if __name__ == "__main__":
    if sys.argv[1].startswith("drill:"):
        seed, kills, events = map(int, sys.argv[1].split(":")[1:])
        raise SystemExit(drill(seed, kills, events, sys.argv[2:]))
    install(sys.argv[1])
    raise SystemExit(main(sys.argv[2:]))
