"""Taps in network namespaces for the virtio-net tests, and the host side of the
conversation: the kernel's own stack pings the guest through the tap, a packet
socket on the tap sees every frame the VM sends.

    namespace svn<tag>: tap <name>, HOST_ADDRESS/24, up; the test guest answers
    on GUEST_ADDRESS (tg.ip=...)

Addresses are from TEST-NET-2 (RFC 5737). Each "host" is its own namespace, so
two can use the same addresses (a restore or a migration onto another host).
Everything is removed again by close(), which the fixtures call also when a test
fails. Module name unique: every test directory is on sys.path.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

# The namespace and process helpers of the live-migration lab.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "migrate"))
from migrate_lab import REPO_ROOT, Process, ip, netns_available  # noqa: E402,F401 (ip: for users of this module)

HOST_ADDRESS = "198.51.100.1"
GUEST_ADDRESS = "198.51.100.2"
PREFIX = 24
CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
ETH_P_RARP = 0x8035
ICMP_ECHO, ICMP_ECHO_REPLY = 8, 0

_libc = ctypes.CDLL(None, use_errno=True)


def guest_cmdline(extra: str = "") -> str:
    """A test guest that runs until stopped, light on memory, answering on GUEST_ADDRESS."""
    return f"console=ttyS0 tg.mem=4 tg.rounds=0 tg.rate=2 tg.ip={GUEST_ADDRESS} {extra}".strip()


def net_unavailable() -> str | None:
    """Why taps in namespaces cannot be made here, or None."""
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing"
    return netns_available()


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block in network namespace `ns` (this thread only): sockets and taps
    opened there stay in it."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(home)


class TapHost:
    """One "host": a namespace with taps for VMs, and snapvisor processes run in it."""

    def __init__(self, workdir: Path, label: str, ns: str | None = None) -> None:
        """A new namespace, or taps in existing namespace `ns` (a migration lab's
        host), which close() then leaves to its owner."""
        self.ns = ns or f"svn{secrets.token_hex(3)}{label}"
        self.owned = ns is None
        self.workdir = workdir
        self.processes: list[Process] = []
        if self.owned:
            ip("netns", "add", self.ns)
        ip("-n", self.ns, "link", "set", "lo", "up")
        # No IPv6 here: its router and multicast chatter would land in the guest's queues.
        for key in ("all", "default"):
            subprocess.run(["ip", "netns", "exec", self.ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"],
                           check=True, capture_output=True, timeout=30)

    def add_tap(self, name: str, address: str | None = HOST_ADDRESS) -> str:
        ip("-n", self.ns, "tuntap", "add", name, "mode", "tap")
        if address:
            ip("-n", self.ns, "addr", "add", f"{address}/{PREFIX}", "dev", name)
        ip("-n", self.ns, "link", "set", name, "up")
        return name

    def run(self, label: str, args: list[str], prefix: list[str] = ()) -> Process:
        """`snapvisor ARGS` in this namespace (through `prefix`, say setpriv)."""
        env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", str(REPO_ROOT)))
        process = Process(["ip", "netns", "exec", self.ns, *prefix, sys.executable, "-m", "snapvisor", *args], env,
                          self.workdir, label)
        self.processes.append(process)
        return process

    def pinger(self) -> "Pinger":
        with inside(self.ns):
            return Pinger(socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))

    def sniffer(self, tap: str, protocol: int = ETH_P_ALL) -> socket.socket:
        """A packet socket on `tap`: it sees what the VM writes into the tap."""
        with inside(self.ns):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(protocol))
            sock.bind((tap, 0))
        return sock

    def close(self) -> None:
        for process in self.processes:
            process.close()
        if self.owned:
            ip("netns", "del", self.ns)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class Pinger:
    """ICMP echo through the host's stack (a raw socket, as ping uses)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ident = secrets.randbits(16)
        self.seq = 0

    def send(self, address: str = GUEST_ADDRESS, payload: bytes = b"snapvisor-ping" * 4) -> int:
        self.seq = (self.seq + 1) & 0xFFFF
        header = struct.pack("!BBHHH", ICMP_ECHO, 0, 0, self.ident, self.seq)
        packet = header[:2] + struct.pack("!H", _checksum(header + payload)) + header[4:] + payload
        self.sock.sendto(packet, (address, 0))
        return self.seq

    def _next_reply(self, deadline: float) -> tuple[int, bytes] | None:
        """The next echo reply to us before `deadline`: (seq, payload)."""
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, _ = self.sock.recvfrom(65536)
            except socket.timeout:
                return None
            icmp = data[(data[0] & 0xF) * 4 :]
            kind, _, _, ident, seq = struct.unpack("!BBHHH", icmp[:8])
            if kind == ICMP_ECHO_REPLY and ident == self.ident and _checksum(icmp) == 0:
                return seq, icmp[8:]
        return None

    def replies(self, timeout: float) -> list[tuple[int, bytes]]:
        """(seq, payload) of the echo replies to us that arrive within `timeout`."""
        deadline = time.monotonic() + timeout
        out = []
        while (reply := self._next_reply(deadline)) is not None:
            out.append(reply)
        return out

    def ping(self, timeout: float = 5.0, address: str = GUEST_ADDRESS) -> bool:
        """An echo request every half second until one is answered (True) or
        `timeout` passes: the first may be lost while the guest is not there yet
        (the host's ARP gives up on it)."""
        deadline = time.monotonic() + timeout
        sent: set[int] = set()
        while time.monotonic() < deadline:
            sent.add(self.send(address))
            wait_until = min(deadline, time.monotonic() + 0.5)
            while (reply := self._next_reply(wait_until)) is not None:
                if reply[0] in sent:
                    return True
        return False

    def close(self) -> None:
        self.sock.close()


def wait_for_console(process: Process, text: bytes, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        console = process.stdout()
        if text in console:
            return console
        if process.popen.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{process.label} did not print {text!r} (exit {process.popen.poll()}): "
                         f"{process.stdout()[-1500:]!r} {process.stderr()[-1500:]}")
