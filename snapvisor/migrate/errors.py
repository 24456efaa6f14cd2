"""Errors of a migration. Each says what failed, where the VM runs now, and what to do."""

from snapvisor.errors import SnapvisorError


class MigrationError(SnapvisorError):
    """A migration did not complete; the message says where the VM runs now."""


class StreamError(MigrationError):
    """The migration stream is broken, corrupt, or from an incompatible snapvisor."""


class HandoverUnconfirmed(MigrationError):
    """GO may have reached the receiver, and its confirmation did not arrive: the VM
    is paused here and may run there. Only the operator can tell which."""

    exit_code = 5
    RESUME = "snapvisor resume --force"

    def __init__(self, to: str, cause: str, resume: str = RESUME) -> None:
        super().__init__(f"migration to {to}: handover unconfirmed: the target may be running the VM; check it; "
                         f"`{resume}` only if it is not (the VM is paused here; {cause})")
        self.to = to
        self.cause = cause

    def resumed_by(self, resume: str) -> "HandoverUnconfirmed":
        """The same error naming another way to resume (the boot form has no API socket)."""
        return HandoverUnconfirmed(self.to, self.cause, resume)
