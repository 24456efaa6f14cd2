"""A host tap device opened for one virtio-net device: /dev/net/tun with
IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, the vnet header sized like virtio 1.x's
(12 bytes), so frames pass between the tap and the guest's queues with their
header unchanged (Firecracker and QEMU do the same).

A tap is opened, never created behind the operator's back: with `create` a
missing one is created (and brought up), and the caller says so. Every failure
is a TapError naming the tap and what to do.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from snapvisor.vmm.errors import VmConfigError

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
# The offloads a virtio-net device may pass on to the guest (and accept from it).
TUN_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6

VNET_HDR_SIZE = 12  # struct virtio_net_hdr_v1 (with num_buffers)
IFNAMSIZ = 16


class TapError(VmConfigError):
    """A tap device cannot be used; the message names it and the fix."""


def _ifreq(name: str, flags: int = 0) -> bytes:
    return struct.pack("16sH22x", name.encode(), flags)


def interface_exists(name: str) -> bool:
    """Whether `name` is a network interface in this process's namespace."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def check_tap_name(name: str) -> None:
    if not 0 < len(name.encode()) < IFNAMSIZ or any(c in name for c in "/ \t\n:,=") or name in (".", ".."):
        raise TapError(f"{name!r} is not a usable interface name: 1 to 15 characters, no '/', ',', '=', ':' or spaces")


def require_tap(name: str, create: bool = False, missing_hint: str = "") -> bool:
    """Whether tap `name` exists (False: it is to be created); TapError if it is
    missing and may not be created, or the name is not usable."""
    check_tap_name(name)
    exists = interface_exists(name)
    if not exists and not create:
        raise TapError(
            f"tap {name} does not exist on this host: create it (`ip tuntap add {name} mode tap && "
            f"ip link set {name} up`)" + (f", {missing_hint}" if missing_hint else "")
        )
    return exists


class Tap:
    def __init__(self, name: str, fd: int, created: bool) -> None:
        self.name = name
        self.fd = fd
        self.created = created  # snapvisor created it: it goes away with this process
        self.offloads = _probe_offloads(fd)  # TUN_F_* the tap accepts, 0 if none

    @classmethod
    def open(cls, name: str, create: bool = False, missing_hint: str = "") -> "Tap":
        """Attach to tap `name`; with `create`, create it if it does not exist."""
        exists = require_tap(name, create, missing_hint)
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TapError(f"{TUN_PATH} does not exist, so tap {name} cannot be opened: load the tun module "
                           f"(`modprobe tun`)") from None
        except PermissionError:
            raise TapError(f"no permission to open {TUN_PATH} for tap {name}: run snapvisor as root or with "
                           f"CAP_NET_ADMIN, or give this user access to {TUN_PATH}") from None
        try:
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        except OSError as exc:
            os.close(fd)
            raise TapError(_attach_failure(name, exc)) from None
        tap = cls(name, fd, created=not exists)
        if tap.created:
            try:
                _bring_up(name)
            except OSError as exc:
                tap.close()
                raise TapError(f"created tap {name} but cannot bring it up: {os.strerror(exc.errno or 0)}; "
                               f"create it yourself (`ip tuntap add {name} mode tap && ip link set {name} up`)") from None
        return tap

    def set_offloads(self, flags: int) -> None:
        """What the tap may hand us: only offloads the guest negotiated."""
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags & self.offloads)

    def read_into(self, buffer: bytearray) -> int | None:
        """One frame (vnet header first) into `buffer`; None when none is waiting."""
        try:
            return os.readv(self.fd, [buffer])
        except BlockingIOError:
            return None

    def write(self, parts: list) -> None:
        os.writev(self.fd, parts)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _probe_offloads(fd: int) -> int:
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_OFFLOADS)
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)  # none until the guest negotiates them
    except OSError:
        return 0
    return TUN_OFFLOADS


def _attach_failure(name: str, exc: OSError) -> str:
    if exc.errno == errno.EBUSY:
        return (f"tap {name} is in use by another process (another VM?): stop it, or give this VM "
                f"another tap")
    if exc.errno == errno.EINVAL:
        return (f"{name} is not a single-queue tap device: give the name of a tap "
                f"(`ip tuntap add {name} mode tap`)")
    if exc.errno == errno.EPERM:
        return (f"no permission to attach tap {name}: run snapvisor as root or with CAP_NET_ADMIN, or "
                f"create the tap for this user (`ip tuntap add {name} mode tap user $USER`)")
    return f"cannot attach tap {name}: {os.strerror(exc.errno or 0)}"


def _bring_up(name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        flags = struct.unpack_from("16sH", fcntl.ioctl(sock, SIOCGIFFLAGS, _ifreq(name)))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, _ifreq(name, flags | IFF_UP))
