"""The one exception family for bad input a user can fix (a wrong path, a malformed file, a
config typo). The CLI prints these as one clear line, without a traceback."""


class MinigptError(Exception):
    """Base class; the message names the problem and the fix."""


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
