"""The 16550A model, driven register by register as a guest driver would."""

from __future__ import annotations

import io

import pytest

from snapvisor.vmm.devices import serial as uart
from snapvisor.vmm.devices.serial import Serial, SerialOutput
from snapvisor.vmm.errors import VmStateError


class IrqLine:
    def __init__(self) -> None:
        self.levels: list[int] = []

    def __call__(self, level: int) -> None:
        self.levels.append(level)

    @property
    def level(self) -> int:
        return self.levels[-1] if self.levels else 0


@pytest.fixture
def line() -> IrqLine:
    return IrqLine()


@pytest.fixture
def out() -> io.BytesIO:
    return io.BytesIO()


@pytest.fixture
def port(out: io.BytesIO, line: IrqLine) -> Serial:
    return Serial(SerialOutput(out), line)


def test_transmit_goes_to_the_host_and_the_line_stays_ready(port: Serial, out: io.BytesIO) -> None:
    for byte in b"hi\n":
        assert port.read(uart.LSR, 1) & uart.LSR_THR_EMPTY
        port.write(uart.DATA, 1, byte)
    assert out.getvalue() == b"hi\n"
    assert port.read(uart.LSR, 1) == uart.LSR_THR_EMPTY | uart.LSR_IDLE


def test_output_to_a_file_descriptor(tmp_path, line: IrqLine) -> None:
    path = tmp_path / "console"
    with open(path, "wb", buffering=0) as file:
        port = Serial(SerialOutput(file.fileno()), line)
        port.write(uart.DATA, 1, ord("x"))
    assert path.read_bytes() == b"x"


def test_thr_empty_interrupt_is_raised_and_acknowledged_by_reading_iir(port: Serial, line: IrqLine) -> None:
    port.write(uart.IER, 1, uart.IER_THR_EMPTY)  # enabling THRE with an empty THR interrupts
    assert line.level == 1
    assert port.read(uart.IIR, 1) == uart.IIR_THR_EMPTY
    assert line.level == 0 and port.read(uart.IIR, 1) == uart.IIR_NONE
    port.write(uart.DATA, 1, ord("a"))  # the byte leaves at once: THRE again
    assert line.levels == [1, 0, 1]


def test_received_bytes_interrupt_until_read(port: Serial, line: IrqLine) -> None:
    port.write(uart.IER, 1, uart.IER_RX_AVAILABLE)
    assert port.feed_input(b"ok") == 2
    assert line.level == 1
    assert port.read(uart.IIR, 1) == uart.IIR_RX_AVAILABLE
    assert port.read(uart.LSR, 1) & uart.LSR_DATA_READY
    assert bytes([port.read(uart.DATA, 1), port.read(uart.DATA, 1)]) == b"ok"
    assert line.level == 0 and not port.read(uart.LSR, 1) & uart.LSR_DATA_READY


def test_receive_fifo_is_bounded(port: Serial) -> None:
    assert port.feed_input(bytes(100)) == uart.RX_FIFO_SIZE


def test_divisor_latch_and_scratch(port: Serial) -> None:
    port.write(uart.LCR, 1, uart.LCR_DLAB | 0x03)
    port.write(uart.DATA, 1, 0x01)
    port.write(uart.IER, 1, 0x00)
    assert (port.read(uart.DATA, 1), port.read(uart.IER, 1)) == (0x01, 0x00)
    port.write(uart.LCR, 1, 0x03)
    port.write(uart.SCR, 1, 0x5A)
    assert port.read(uart.SCR, 1) == 0x5A and port.read(uart.IER, 1) == 0


def test_loopback_as_linux_probes_it(port: Serial, out: io.BytesIO) -> None:
    port.write(uart.MCR, 1, uart.MCR_LOOP | uart.MCR_OUT2 | uart.MCR_RTS)
    assert port.read(uart.MSR, 1) & 0xF0 == uart.MSR_DCD | uart.MSR_CTS
    port.write(uart.DATA, 1, 0x42)
    assert out.getvalue() == b"" and port.read(uart.DATA, 1) == 0x42


def test_save_restore_round_trip(port: Serial, out: io.BytesIO, line: IrqLine) -> None:
    port.write(uart.IER, 1, uart.IER_RX_AVAILABLE)
    port.write(uart.SCR, 1, 7)
    port.feed_input(b"xyz")
    state = port.save()
    clone = Serial(SerialOutput(io.BytesIO()), IrqLine())
    clone.restore(state)
    assert clone.save() == state
    assert bytes(clone.read(uart.DATA, 1) for _ in range(3)) == b"xyz"


def test_restore_refuses_other_versions(port: Serial) -> None:
    state = port.save() | {"version": 99}
    with pytest.raises(VmStateError, match="serial state version 99 was written by a newer snapvisor"):
        port.restore(state)
