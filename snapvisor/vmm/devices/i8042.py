"""Just enough of the i8042 keyboard controller for a reset: writing 0xFE (pulse
the reset line) to the command port 0x64 resets the machine, as on a PC. No
keyboard is attached: the status register always says "no data"."""

from __future__ import annotations

from typing import Callable

from snapvisor.vmm.persist import upgraded

COMMAND_PORT = 0x64
CMD_RESET_CPU = 0xFE
STATE_VERSION = 1


class I8042:
    """Registered on the command/status port 0x64 only."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset

    def read(self, offset: int, size: int) -> int:
        return 0  # status: output buffer empty, input buffer empty

    def write(self, offset: int, size: int, value: int) -> None:
        if value & 0xFF == CMD_RESET_CPU:
            self._on_reset()

    def save(self) -> dict:
        return {"version": STATE_VERSION}

    def restore(self, state: dict) -> None:
        state = upgraded("i8042", state, STATE_VERSION)
