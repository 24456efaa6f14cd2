"""A split virtqueue as the device sees it: available chains in, used entries out.

Everything here is guest-controlled: the ring addresses, the indices, every
descriptor's address, length, flags and next index. Nothing is trusted. Ring and
buffer addresses are only ever touched through GuestMemory's bounds-checked
accessors, a chain may not be longer than the queue (which also catches loops),
readable buffers must come before writable ones, and the available index may not
run more than a queue's worth ahead. A violation raises QueueError; the transport
then marks the device DEVICE_NEEDS_RESET and stops serving the queue.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from snapvisor.vmm.errors import GuestMemoryError
from snapvisor.vmm.memory import GuestMemory
from snapvisor.vmm.persist import upgraded

MAX_QUEUE_SIZE = 256
STATE_VERSION = 1

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_USED_ELEM = struct.Struct("<II")  # id, len
_U16 = struct.Struct("<H")


class QueueError(Exception):
    """The guest's queue is malformed; the message says how."""


@dataclass(frozen=True)
class Buffer:
    """One descriptor's buffer, already checked to lie inside guest RAM."""

    gpa: int
    length: int
    writable: bool


@dataclass(frozen=True)
class Chain:
    head: int
    readable: list[Buffer]
    writable: list[Buffer]


class Virtqueue:
    def __init__(self, max_size: int = MAX_QUEUE_SIZE) -> None:
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.next_avail = 0  # the device's copy of the avail index it has consumed up to
        self.next_used = 0

    # --- activation ---------------------------------------------------------------
    def check_layout(self, memory: GuestMemory) -> None:
        """At QueueReady: the size is a power of two the device supports and the
        three rings are aligned and inside guest RAM."""
        if not (0 < self.size <= self.max_size and self.size & (self.size - 1) == 0):
            raise QueueError(f"queue size {self.size} is not a power of two in 1..{self.max_size}")
        for name, addr, align, length in (
            ("descriptor table", self.desc_addr, 16, 16 * self.size),
            ("available ring", self.avail_addr, 2, 6 + 2 * self.size),
            ("used ring", self.used_addr, 4, 6 + 8 * self.size),
        ):
            if addr % align:
                raise QueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            if not memory.contains(addr, length):
                raise QueueError(f"{name} at {addr:#x}+{length:#x} is outside guest RAM")

    # --- the device side of the rings ------------------------------------------------
    def pop(self, memory: GuestMemory) -> Chain | None:
        """The next available chain, or None when the driver has offered no more."""
        chain = self.peek(memory)
        if chain is not None:
            self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chain

    def peek(self, memory: GuestMemory) -> Chain | None:
        """The next available chain, left available (net RX looks before it fills)."""
        avail_idx = self._read_u16(memory, self.avail_addr + 2)
        pending = (avail_idx - self.next_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise QueueError(f"available index {avail_idx} is {pending} entries ahead of {self.next_avail}")
        slot = self.next_avail % self.size
        head = self._read_u16(memory, self.avail_addr + 4 + 2 * slot)
        return self._walk(memory, head)

    def _walk(self, memory: GuestMemory, head: int) -> Chain:
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        # One read of the whole table (at most 4 KiB): what the walk validates is
        # this copy, whatever the guest writes meanwhile.
        table = memory.read(self.desc_addr, 16 * self.size)
        index = head
        for _ in range(self.size):
            if index >= self.size:
                raise QueueError(f"descriptor index {index} is outside the queue of {self.size}")
            addr, length, flags, next_index = _DESC.unpack_from(table, 16 * index)
            if flags & DESC_F_INDIRECT:
                raise QueueError("indirect descriptors were not negotiated")
            if not memory.contains(addr, length):
                raise QueueError(f"descriptor {index}: buffer {addr:#x}+{length:#x} is outside guest RAM")
            if flags & DESC_F_WRITE:
                writable.append(Buffer(addr, length, True))
            elif writable:
                raise QueueError(f"descriptor {index}: a device-readable buffer follows a writable one")
            else:
                readable.append(Buffer(addr, length, False))
            if not flags & DESC_F_NEXT:
                return Chain(head, readable, writable)
            index = next_index
        raise QueueError(f"the chain from descriptor {head} is longer than the queue (a loop)")

    def push(self, memory: GuestMemory, head: int, written: int) -> None:
        """Return chain `head` to the driver with `written` bytes written into it;
        the entry goes in before the index that publishes it."""
        slot = self.next_used % self.size
        memory.write(self.used_addr + 4 + 8 * slot, _USED_ELEM.pack(head, written))
        self.next_used = (self.next_used + 1) & 0xFFFF
        memory.write(self.used_addr + 2, _U16.pack(self.next_used))

    def wants_interrupt(self, memory: GuestMemory) -> bool:
        return not self._read_u16(memory, self.avail_addr) & AVAIL_F_NO_INTERRUPT

    @staticmethod
    def _read_u16(memory: GuestMemory, gpa: int) -> int:
        try:
            return _U16.unpack(memory.read(gpa, 2))[0]
        except GuestMemoryError as exc:
            raise QueueError(str(exc)) from None

    # --- persistence ---------------------------------------------------------------
    def save(self) -> dict:
        return {
            "version": STATE_VERSION,
            "size": self.size,
            "ready": self.ready,
            "desc_addr": self.desc_addr,
            "avail_addr": self.avail_addr,
            "used_addr": self.used_addr,
            "next_avail": self.next_avail,
            "next_used": self.next_used,
        }

    def restore(self, state: dict) -> None:
        state = upgraded("virtqueue", state, STATE_VERSION)
        self.size = int(state["size"])
        self.ready = bool(state["ready"])
        self.desc_addr = int(state["desc_addr"])
        self.avail_addr = int(state["avail_addr"])
        self.used_addr = int(state["used_addr"])
        self.next_avail = int(state["next_avail"]) & 0xFFFF
        self.next_used = int(state["next_used"]) & 0xFFFF
