"""The i8042 keyboard controller, with no keyboard or mouse behind it: it
answers every controller command Linux's i8042 driver sends while probing, so
the probe ends at once (no "Can't read CTR" timeouts), and writing 0xFE
(pulse the reset line) to the command port resets the machine, as on a PC.

Ports: 0x60 data, 0x64 command (write) / status (read). Registered as the
range 0x60-0x64; 0x61 belongs to the in-kernel PIT and never reaches the VMM,
0x62 and 0x63 read as all ones.
"""

from __future__ import annotations

from typing import Callable

DATA_PORT = 0x60
COMMAND_PORT = 0x64
PORT_RANGE = COMMAND_PORT - DATA_PORT + 1
_DATA_OFFSET = 0
_COMMAND_OFFSET = COMMAND_PORT - DATA_PORT
KEYBOARD_IRQ = 1
STATE_VERSION = 2

# Status register bits
STATUS_OUTPUT_FULL = 1 << 0
STATUS_SYSTEM = 1 << 2  # self test passed
STATUS_LAST_WAS_COMMAND = 1 << 3
STATUS_UNLOCKED = 1 << 4
STATUS_AUX_DATA = 1 << 5

# Controller configuration byte (CTR) bits
CTR_KEYBOARD_INTERRUPT = 1 << 0
CTR_SYSTEM = 1 << 2
CTR_KEYBOARD_DISABLED = 1 << 4
CTR_AUX_DISABLED = 1 << 5
CTR_TRANSLATE = 1 << 6
POWER_ON_CTR = CTR_KEYBOARD_INTERRUPT | CTR_SYSTEM | CTR_AUX_DISABLED | CTR_TRANSLATE

# Controller commands
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KEYBOARD_TEST = 0xAB
CMD_KEYBOARD_DISABLE = 0xAD
CMD_KEYBOARD_ENABLE = 0xAE
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_KEYBOARD_OUTPUT = 0xD2
CMD_WRITE_AUX_OUTPUT = 0xD3
CMD_WRITE_AUX = 0xD4
CMD_RESET_CPU = 0xFE
_TAKES_PARAMETER = {CMD_WRITE_CTR, CMD_WRITE_OUTPUT_PORT, CMD_WRITE_KEYBOARD_OUTPUT, CMD_WRITE_AUX_OUTPUT, CMD_WRITE_AUX}

SELF_TEST_PASSED = 0x55
INTERFACE_OK = 0x00
AUX_CLOCK_STUCK_LOW = 0x01  # no mouse port: what Linux takes for "no AUX"
KEYBOARD_NAK = 0xFE  # no keyboard answers: every byte sent to it is refused at once
OUTPUT_PORT_RESET_LINE = 1 << 0  # 0 in a written output port pulls the reset line
_ANSWERS = {CMD_AUX_TEST: AUX_CLOCK_STUCK_LOW, CMD_SELF_TEST: SELF_TEST_PASSED, CMD_KEYBOARD_TEST: INTERFACE_OK}
_SETS_CTR_BIT = {CMD_AUX_DISABLE: CTR_AUX_DISABLED, CMD_KEYBOARD_DISABLE: CTR_KEYBOARD_DISABLED}
_CLEARS_CTR_BIT = {CMD_AUX_ENABLE: CTR_AUX_DISABLED, CMD_KEYBOARD_ENABLE: CTR_KEYBOARD_DISABLED}


class I8042:
    def __init__(self, on_reset: Callable[[], None], pulse_irq: Callable[[int], None]) -> None:
        self._on_reset = on_reset
        self._pulse_irq = pulse_irq
        self._power_on()

    def _power_on(self) -> None:
        self.ctr = POWER_ON_CTR
        self.output: int | None = None  # the one-byte output buffer
        self.pending_command: int | None = None  # a command waiting for its data byte
        self.last_was_command = False

    # --- the guest's side ------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == _DATA_OFFSET:
            value, self.output = (self.output if self.output is not None else 0), None
            return value
        if offset == _COMMAND_OFFSET:
            return self._status()
        return 0xFF  # 0x62, 0x63: nothing there

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == _COMMAND_OFFSET:
            self.last_was_command = True
            self._command(value)
        elif offset == _DATA_OFFSET:
            self.last_was_command = False
            command, self.pending_command = self.pending_command, None
            if command is None:
                self._to_keyboard()
            else:
                self._parameter(command, value)

    def _status(self) -> int:
        status = STATUS_SYSTEM | STATUS_UNLOCKED
        if self.output is not None:
            status |= STATUS_OUTPUT_FULL
        if self.last_was_command:
            status |= STATUS_LAST_WAS_COMMAND
        return status

    def _command(self, command: int) -> None:
        self.pending_command = command if command in _TAKES_PARAMETER else None
        if command == CMD_READ_CTR:
            self.output = self.ctr
        elif command in _ANSWERS:
            self.output = _ANSWERS[command]
        elif command in _SETS_CTR_BIT:
            self.ctr |= _SETS_CTR_BIT[command]
        elif command in _CLEARS_CTR_BIT:
            self.ctr &= ~_CLEARS_CTR_BIT[command]
        elif command == CMD_RESET_CPU:
            self._on_reset()

    def _parameter(self, command: int, value: int) -> None:
        if command == CMD_WRITE_CTR:
            self.ctr = value
        elif command == CMD_WRITE_OUTPUT_PORT and not value & OUTPUT_PORT_RESET_LINE:
            self._on_reset()
        elif command in (CMD_WRITE_KEYBOARD_OUTPUT, CMD_WRITE_AUX_OUTPUT):
            # Echoed as keyboard data: with no AUX port even the AUX loop-back
            # comes back without the AUX bit, which is how Linux sees "no mouse".
            self._from_keyboard(value)
        # CMD_WRITE_AUX: there is no mouse to send the byte to.

    def _to_keyboard(self) -> None:
        """A byte for the keyboard: nobody is there, so the answer is a refusal."""
        self._from_keyboard(KEYBOARD_NAK)

    def _from_keyboard(self, value: int) -> None:
        self.output = value
        if self.ctr & CTR_KEYBOARD_INTERRUPT and not self.ctr & CTR_KEYBOARD_DISABLED:
            self._pulse_irq(KEYBOARD_IRQ)

    # --- persistence --------------------------------------------------------------
    def save(self) -> dict:
        return {
            "version": STATE_VERSION,
            "ctr": self.ctr,
            "output": self.output,
            "pending_command": self.pending_command,
            "last_was_command": self.last_was_command,
        }

    def restore(self, state: dict) -> None:
        version = state.get("version")
        if version == 1:  # saved when the controller had no state: as powered on
            self._power_on()
            return
        if version != STATE_VERSION:
            raise ValueError(f"i8042 state version {version} is not {STATE_VERSION}")
        ctr, output, pending = state.get("ctr"), state.get("output"), state.get("pending_command")
        if not _is_byte(ctr) or not (output is None or _is_byte(output)) or pending not in _TAKES_PARAMETER | {None}:
            raise ValueError(f"i8042 state {state!r} is not valid")
        self.ctr, self.output, self.pending_command = ctr, output, pending
        self.last_was_command = bool(state.get("last_was_command"))


def _is_byte(value: object) -> bool:
    return isinstance(value, int) and 0 <= value <= 0xFF
