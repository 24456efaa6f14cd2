"""Errors raised by the VMM, one subclass per operation.

Every message says what failed and, where there is one, how to fix it; the CLI
prints it without a traceback.
"""

from __future__ import annotations

import errno as errno_module
import os

from snapvisor.errors import SnapvisorError


class KvmError(SnapvisorError):
    """An ioctl on /dev/kvm (or a VM / vCPU fd) failed."""

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        self.ioctl = ioctl
        self.errno = errno
        self.errno_name = errno_module.errorcode.get(errno, f"errno {errno}")
        message = f"{ioctl} failed: {self.errno_name} ({os.strerror(errno)})"
        if detail:
            message += f": {detail}"
        super().__init__(message)


class KvmUnavailableError(SnapvisorError):
    """/dev/kvm is missing, not accessible, or speaks another API version."""


class GuestMemoryError(SnapvisorError):
    """A guest-physical access falls outside guest RAM, or memory setup failed."""


class VmConfigError(SnapvisorError):
    """The requested VM does not fit: memory size, vCPU count, paths."""


class BootError(SnapvisorError):
    """The kernel, initrd or command line cannot be loaded."""


class VmStateError(SnapvisorError):
    """A VM state dict cannot be saved or restored (wrong version, sizes, layout)."""


class VmRuntimeError(SnapvisorError):
    """The running VM cannot be paused, resumed or stopped as asked."""
