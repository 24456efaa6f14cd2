"""The ioctl primitive shared by the system, VM and vCPU objects."""

from __future__ import annotations

import os
from typing import Any

from snapvisor.vmm.errors import KvmError
from snapvisor.vmm.kvm.bindings import ffi, libc

_ioctl = libc.ioctl


class KvmFd:
    """Owns one KVM file descriptor; subclasses add one method per ioctl."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "KvmFd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ioctl(self, name: str, request: int, arg: Any = None) -> int:
        """Issue one ioctl; `arg` is a cdata pointer, an int, or None (0).

        cffi releases the GIL for the call, so a blocking KVM_RUN does not hold
        up other threads.
        """
        if arg is None:
            arg = ffi.cast("unsigned long", 0)
        elif isinstance(arg, int):
            arg = ffi.cast("unsigned long", arg)
        result = _ioctl(self._fd, request, arg)
        if result < 0:
            raise KvmError(name, ffi.errno)
        return result
