"""Errors of a migration. Each says what failed, where the VM runs now, and what to do."""

from snapvisor.errors import SnapvisorError


class MigrationError(SnapvisorError):
    """A migration did not complete; the message says where the VM runs now."""


class StreamError(MigrationError):
    """The migration stream is broken, corrupt, or from an incompatible snapvisor.
    `peer_closed`: the peer's side of the connection is gone (its process ended or
    closed it), as opposed to a stall, where the peer may still be alive."""

    def __init__(self, message: str, peer_closed: bool = False) -> None:
        super().__init__(message)
        self.peer_closed = peer_closed
