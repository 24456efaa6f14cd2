"""A thin binding of Linux userfaultfd(2): one method per ioctl, no policy.

Lazy restore registers guest RAM with a userfaultfd in MISSING mode: the first
touch of a page (by a vCPU through KVM, or by the VMM itself) blocks until a
handler thread fills it with UFFDIO_COPY or UFFDIO_ZEROPAGE.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from cffi import FFI

from snapvisor.errors import SnapvisorError

_ffi = FFI()
_ffi.cdef(
    """
    struct uffdio_range { uint64_t start; uint64_t len; };
    struct uffdio_api { uint64_t api; uint64_t features; uint64_t ioctls; };
    struct uffdio_register { struct uffdio_range range; uint64_t mode; uint64_t ioctls; };
    struct uffdio_copy { uint64_t dst; uint64_t src; uint64_t len; uint64_t mode; int64_t copy; };
    struct uffdio_zeropage { struct uffdio_range range; uint64_t mode; int64_t zeropage; };
    struct uffd_pagefault { uint8_t event; uint8_t r1; uint16_t r2; uint32_t r3;
                            uint64_t flags; uint64_t address; uint32_t ptid; uint32_t pad; };
    long syscall(long number, ...);
    int ioctl(int fd, unsigned long request, ...);
    """
)
_libc = _ffi.dlopen(None)

_SYS_USERFAULTFD = 323  # x86_64
_UFFD_API = 0xAA
_UFFDIO = 0xAA
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_MSG_SIZE = 32
_REGISTER_MODE_MISSING = 1
_COPY_MODE_DONTWAKE = 1


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (_UFFDIO << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (_UFFDIO << 8) | nr


_UFFDIO_API = _iowr(0x3F, _ffi.sizeof("struct uffdio_api"))
_UFFDIO_REGISTER = _iowr(0x00, _ffi.sizeof("struct uffdio_register"))
_UFFDIO_UNREGISTER = _ior(0x01, _ffi.sizeof("struct uffdio_range"))
_UFFDIO_WAKE = _ior(0x02, _ffi.sizeof("struct uffdio_range"))
_UFFDIO_COPY = _iowr(0x03, _ffi.sizeof("struct uffdio_copy"))
_UFFDIO_ZEROPAGE = _iowr(0x04, _ffi.sizeof("struct uffdio_zeropage"))

assert _ffi.sizeof("struct uffd_pagefault") == UFFD_MSG_SIZE


class UserfaultError(SnapvisorError):
    """A userfaultfd call failed."""

    def __init__(self, call: str, err: int) -> None:
        self.call = call
        self.errno = err
        super().__init__(f"userfaultfd {call} failed: {errno.errorcode.get(err, err)} ({os.strerror(err)})")


@dataclass(frozen=True)
class PageFault:
    address: int
    write: bool


class Userfaultfd:
    """One userfaultfd: register ranges, read faults, fill pages."""

    def __init__(self) -> None:
        fd = _libc.syscall(_SYS_USERFAULTFD, _ffi.cast("int", os.O_CLOEXEC | os.O_NONBLOCK))
        if fd < 0:
            err = _ffi.errno
            hint = " (needs root or vm.unprivileged_userfaultfd=1)" if err == errno.EPERM else ""
            raise UserfaultError("userfaultfd()" + hint, err)
        self.fd: int = fd
        api = _ffi.new("struct uffdio_api *", {"api": _UFFD_API, "features": 0})
        self._ioctl("UFFDIO_API", _UFFDIO_API, api)
        self._copy = _ffi.new("struct uffdio_copy *")
        self._zero = _ffi.new("struct uffdio_zeropage *")
        self._msg = _ffi.new("struct uffd_pagefault *")
        self._msg_buf = _ffi.buffer(self._msg)

    def _ioctl(self, name: str, request: int, arg) -> None:
        if _libc.ioctl(self.fd, _ffi.cast("unsigned long", request), arg) < 0:
            raise UserfaultError(name, _ffi.errno)

    def register_missing(self, start: int, length: int) -> None:
        reg = _ffi.new("struct uffdio_register *", {"range": {"start": start, "len": length}, "mode": _REGISTER_MODE_MISSING})
        self._ioctl("UFFDIO_REGISTER", _UFFDIO_REGISTER, reg)

    def unregister(self, start: int, length: int) -> None:
        rng = _ffi.new("struct uffdio_range *", {"start": start, "len": length})
        self._ioctl("UFFDIO_UNREGISTER", _UFFDIO_UNREGISTER, rng)

    def wake(self, start: int, length: int) -> None:
        rng = _ffi.new("struct uffdio_range *", {"start": start, "len": length})
        self._ioctl("UFFDIO_WAKE", _UFFDIO_WAKE, rng)

    def copy(self, dst: int, src: int, length: int) -> int:
        """Fill [dst, dst+length) from host address src; returns the bytes copied.

        Stops early (and returns fewer bytes) at a page that is already present,
        which happens when another thread filled it first.
        """
        c = self._copy
        c.dst, c.src, c.len, c.mode, c.copy = dst, src, length, 0, 0
        if _libc.ioctl(self.fd, _ffi.cast("unsigned long", _UFFDIO_COPY), c) < 0:
            err = _ffi.errno
            if err != errno.EEXIST:
                raise UserfaultError("UFFDIO_COPY", err)
            return max(int(c.copy), 0)
        return int(c.copy)

    def zeropage(self, dst: int, length: int) -> int:
        z = self._zero
        z.range.start, z.range.len, z.mode, z.zeropage = dst, length, 0, 0
        if _libc.ioctl(self.fd, _ffi.cast("unsigned long", _UFFDIO_ZEROPAGE), z) < 0:
            err = _ffi.errno
            if err != errno.EEXIST:
                raise UserfaultError("UFFDIO_ZEROPAGE", err)
            return max(int(z.zeropage), 0)
        return int(z.zeropage)

    def read_fault(self) -> PageFault | None:
        """The next page fault, or None when none is queued (the fd is non-blocking)."""
        try:
            n = os.readv(self.fd, [self._msg_buf])
        except BlockingIOError:
            return None
        if n != UFFD_MSG_SIZE or self._msg.event != UFFD_EVENT_PAGEFAULT:
            return None
        return PageFault(address=int(self._msg.address), write=bool(self._msg.flags & 1))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def address_of(buffer) -> int:
    """Host virtual address of a writable buffer (a memoryview of an mmap)."""
    return int(_ffi.cast("uintptr_t", _ffi.from_buffer(buffer)))
