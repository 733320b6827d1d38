"""`python -m minigpt` with one fault injected, for the tests that prove a run recovers from it.

    python tests/faulty_minigpt.py FAULT VERB ARGS...
    torchrun ... tests/faulty_minigpt.py FAULT train ARGS...

FAULT is one of
    step:N        SIGKILL once step N is done (logged, evaluated, checkpointed if due), before
                  step N+1 starts
    checkpoint:N  SIGKILL halfway through writing step N's checkpoint: its files are written,
                  not yet renamed into place
    sigterm:N     SIGTERM to itself during step N (a preemption notice: the step finishes)
Under torchrun the fault fires in the first attempt only, so that the restart can recover.
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


def install(fault: str) -> None:
    event, _, step = fault.partition(":")
    if event not in ("step", "checkpoint", "sigterm") or not step.isdigit():
        raise SystemExit(f"faulty_minigpt: unknown fault {fault!r}")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return  # a torchrun restart: this attempt is the recovery
    if event == "checkpoint":
        _die_before_publishing(int(step))
    elif event == "step":
        _signal_at_step(int(step), signal.SIGKILL, before=False)
    else:  # the handler runs at once; the trainer acts on it after the step
        _signal_at_step(int(step), signal.SIGTERM, before=True)


if __name__ == "__main__":
    install(sys.argv[1])
    raise SystemExit(main(sys.argv[2:]))
