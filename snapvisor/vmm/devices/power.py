"""The power-off port: a byte written to port 0x501 powers the VM off, and that
byte is the VM's exit status (docs/architecture.md, "Test guest protocol").

ACPI-less on purpose: a guest needs one `out` instruction to stop with a result.
"""

from __future__ import annotations

from typing import Callable

from snapvisor.vmm.persist import upgraded

POWER_OFF_PORT = 0x501
STATE_VERSION = 1


class PowerOffPort:
    def __init__(self, on_power_off: Callable[[int], None]) -> None:
        self._on_power_off = on_power_off

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self._on_power_off(value & 0xFF)

    def save(self) -> dict:
        return {"version": STATE_VERSION}

    def restore(self, state: dict) -> None:
        state = upgraded("power-off port", state, STATE_VERSION)
