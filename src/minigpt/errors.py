"""The one exception family for bad input a user can fix (a wrong path, a malformed file, a
config typo). The CLI prints these as one clear line, without a traceback."""


class MinigptError(Exception):
    """Base class; the message names the problem and the fix."""


class WriteFailed(MinigptError):
    """A file that could not be written: a full disk (ENOSPC), a failing one (EIO), a quota."""


def write_failed(path, error: BaseException, then: str) -> WriteFailed:
    """One line for a write of `path` that failed with `error`: the cause as the system gave it
    (found behind the RuntimeError torch's writer raises), the space left, what to do `then`."""
    import shutil
    from pathlib import Path

    seen = error
    while seen is not None and not isinstance(seen, OSError):  # torch's error wraps the OSError
        seen = seen.__cause__ or seen.__context__
    cause = seen.strerror if seen is not None and seen.strerror else str(error).strip()
    free = next(
        (shutil.disk_usage(p).free for p in Path(path).absolute().parents if p.exists()), None
    )
    space = f" ({free:,} bytes free on its disk)" if free is not None else ""
    return WriteFailed(f"cannot write {path}: {cause}{space}; {then}")


# exit status of a run stopped by SIGTERM/SIGUSR1 after writing a checkpoint (EX_TEMPFAIL: "try
# again"), so scripts and schedulers can tell "preempted, resume me" from success and from failure
EXIT_INTERRUPTED = 75


class TrainingInterrupted(Exception):
    """A stop signal ended training after a checkpoint; `--resume latest` continues it."""

    def __init__(self, step: int, signum: int):
        import signal

        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}, checkpoint written; "
            "continue with --resume latest"
        )
        self.step, self.signum = step, signum
