"""`minigpt-torchrun` (`python -m minigpt.launch`): torchrun, with what preemption needs.

Takes torchrun's own options and command line. Two differences, both for clusters that warn
before they preempt (SLURM's `--signal=USR1@120`, Kubernetes' SIGTERM):
- SIGUSR1 is forwarded to the workers besides torchrun's default SIGTERM, SIGINT, SIGHUP and
  SIGQUIT (plain torchrun dies on SIGUSR1 and leaves its workers training, orphaned);
- a stop signal, forwarded to workers that then checkpoint and exit 75, or workers that all exit
  75 on their own, end the launcher with status 75 (EX_TEMPFAIL: resume later) as a single
  process would; plain torchrun reports either as failure, status 1.
"""

from __future__ import annotations

import signal
import sys

from minigpt.errors import EXIT_INTERRUPTED

FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")
STOPS = (signal.SIGTERM, signal.SIGUSR1)  # what the trainer checkpoints and stops on


def with_forwarded_signals(argv: list[str]) -> list[str]:
    """torchrun's arguments, with `--signals-to-handle` set unless the caller set it."""
    options = argv[: argv.index("-m")] if "-m" in argv else argv
    if any(a.startswith(("--signals-to-handle", "--signals_to_handle")) for a in options):
        return argv
    return [f"--signals-to-handle={','.join(FORWARDED)}", *argv]


def stopped_alike(error) -> bool:
    """Whether workers failed only by stopping: the first to exit exited 75, and each other one
    exited 75 too or was ended by the SIGTERM torchrun sends the rest once one has exited (the
    ranks stop together, after the checkpoint that every rank waits for)."""
    _, first = error.get_first_failure()
    codes = {failure.exitcode for failure in error.failures.values()}
    return first.exitcode == EXIT_INTERRUPTED and codes <= {EXIT_INTERRUPTED, -signal.SIGTERM}


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(with_forwarded_signals(list(sys.argv[1:] if argv is None else argv)))
    except SignalException as e:
        if e.sigval not in STOPS:
            raise
        name = signal.Signals(e.sigval).name
        print(f"minigpt-torchrun: {name} forwarded to the workers; exit {EXIT_INTERRUPTED}, "
              "continue with --resume latest", file=sys.stderr, flush=True)  # fmt: skip
        return EXIT_INTERRUPTED
    except ChildFailedError as e:
        if not stopped_alike(e):
            raise
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
