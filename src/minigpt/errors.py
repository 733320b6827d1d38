"""The one exception family for bad input a user can fix (a wrong path, a malformed file, a
config typo). The CLI prints these as one clear line, without a traceback."""


class MinigptError(Exception):
    """Base class; the message names the problem and the fix."""
