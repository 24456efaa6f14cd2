"""The base of every error a user may see.

Each operation raises its own subclass with a message that names what failed and
how to fix it; the CLI prints that message and exits non-zero, without a traceback.
"""


class SnapvisorError(Exception):
    """An error with a message meant for the operator."""

    exit_code: int = 1
