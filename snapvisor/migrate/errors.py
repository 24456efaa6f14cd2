"""Errors of a migration. Each says what failed, where the VM runs now, and what to do."""

from snapvisor.errors import SnapvisorError


class MigrationError(SnapvisorError):
    """A migration did not complete; the message says where the VM runs now."""


class StreamError(MigrationError):
    """The migration stream is broken, corrupt, or from an incompatible snapvisor."""
