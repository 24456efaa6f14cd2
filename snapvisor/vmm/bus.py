"""Port-I/O and MMIO buses: route an access to the device owning the address.

Devices see offsets relative to the start of their range and exchange values as
little-endian ints of 1, 2, 4 or 8 bytes.
"""

from __future__ import annotations

import bisect
from typing import Protocol


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class BusConflictError(ValueError):
    pass


class PioBus:
    """The 64 KiB x86 I/O port space. Port ranges are small, so each port maps
    straight to (device, offset): one dict lookup per exit."""

    def __init__(self) -> None:
        self._ports: dict[int, tuple[BusDevice, int]] = {}

    def register(self, base: int, length: int, device: BusDevice) -> None:
        if base < 0 or base + length > 0x10000:
            raise BusConflictError(f"ports {base:#x}+{length} are outside the I/O space")
        taken = [port for port in range(base, base + length) if port in self._ports]
        if taken:
            raise BusConflictError(f"port {taken[0]:#x} is already registered")
        for port in range(base, base + length):
            self._ports[port] = (device, port - base)

    def lookup(self, port: int) -> tuple[BusDevice, int] | None:
        return self._ports.get(port)


class MmioBus:
    """Guest-physical MMIO ranges, sorted for bisection."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, BusDevice]] = []

    def register(self, base: int, length: int, device: BusDevice) -> None:
        index = bisect.bisect_right(self._starts, base)
        if index > 0:
            prev_base, prev_len, _ = self._ranges[index - 1]
            if prev_base + prev_len > base:
                raise BusConflictError(f"MMIO range {base:#x} overlaps {prev_base:#x}+{prev_len:#x}")
        if index < len(self._ranges) and base + length > self._ranges[index][0]:
            raise BusConflictError(f"MMIO range {base:#x}+{length:#x} overlaps {self._ranges[index][0]:#x}")
        self._starts.insert(index, base)
        self._ranges.insert(index, (base, length, device))

    def lookup(self, address: int, size: int) -> tuple[BusDevice, int] | None:
        index = bisect.bisect_right(self._starts, address) - 1
        if index < 0:
            return None
        base, length, device = self._ranges[index]
        if address + size <= base + length:
            return device, address - base
        return None
