"""The ACPI sleep control and status registers of a hardware-reduced platform
(ACPI 6.5, 4.8.3.7), at two I/O ports the FADT points to. A guest's
`poweroff` ends with Linux writing SLP_TYP = 5 (the DSDT's `\\_S5`) with
SLP_EN set to the control register: the VM powers off with exit status 0.
Other sleep states are not offered (the DSDT declares only `\\_S5`), so
other writes are ignored."""

from __future__ import annotations

from typing import Callable

SLEEP_CONTROL_PORT = 0x504
SLEEP_STATUS_PORT = 0x505
PORT_COUNT = 2
SLEEP_TYPE_SHIFT = 2
SLEEP_TYPE_MASK = 0x7 << SLEEP_TYPE_SHIFT
SLEEP_ENABLE = 1 << 5
SLEEP_TYPE_S5 = 5
WAKE_STATUS = 1 << 7
STATE_VERSION = 1


class AcpiSleepRegisters:
    """Registered on SLEEP_CONTROL_PORT .. +1 (offset 0 control, 1 status)."""

    def __init__(self, on_power_off: Callable[[], None]) -> None:
        self._on_power_off = on_power_off

    def read(self, offset: int, size: int) -> int:
        return 0  # never asleep, so never woken: WAK_STS stays clear

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or not value & SLEEP_ENABLE:
            return  # a status write only clears WAK_STS, which is always clear
        if (value & SLEEP_TYPE_MASK) >> SLEEP_TYPE_SHIFT == SLEEP_TYPE_S5:
            self._on_power_off()

    def save(self) -> dict:
        return {"version": STATE_VERSION}

    def restore(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"ACPI sleep register state version {state.get('version')} is not {STATE_VERSION}")
