"""A 16550A UART (COM1 at port 0x3f8, IRQ 4): transmit goes straight to a host
writer, receive comes from host input, interrupts follow the chip's priorities.

Transmission is instantaneous: the transmitter is always empty again right after
a THR write, which is what a guest polling LSR or waiting for THRE wants.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import BinaryIO, Callable

from snapvisor.vmm.persist import upgraded

COM1_PORT = 0x3F8
COM1_IRQ = 4
PORT_COUNT = 8
STATE_VERSION = 1
RX_FIFO_SIZE = 64

# register offsets
DATA = 0  # RBR read, THR write, DLL when DLAB
IER = 1  # DLH when DLAB
IIR = 2  # FCR on write
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RX_AVAILABLE = 0x01
IER_THR_EMPTY = 0x02

IIR_NONE = 0x01
IIR_THR_EMPTY = 0x02
IIR_RX_AVAILABLE = 0x04
IIR_FIFO_ENABLED = 0xC0

LCR_DLAB = 0x80

LSR_DATA_READY = 0x01
LSR_THR_EMPTY = 0x20
LSR_IDLE = 0x40

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RX = 0x02

# Modem lines of a present, ready terminal.
DEFAULT_MSR = MSR_DCD | MSR_DSR | MSR_CTS


class SerialOutput:
    """Writes transmitted bytes to a file descriptor or a binary file object."""

    def __init__(self, target: BinaryIO | int) -> None:
        self._fd = target if isinstance(target, int) else None
        self._file = None if isinstance(target, int) else target
        self._broken = False

    def write_byte(self, value: int) -> None:
        if self._broken:
            return
        data = bytes((value,))
        try:
            if self._fd is not None:
                os.write(self._fd, data)
            else:
                self._file.write(data)
                if value == 0x0A:
                    self._file.flush()
        except (BrokenPipeError, ValueError, OSError):
            # The reader went away (closed pipe or file): the guest keeps running
            # and its console output is dropped rather than stopping the VM.
            self._broken = True

    def flush(self) -> None:
        if self._file is not None and not self._broken:
            try:
                self._file.flush()
            except (ValueError, OSError):
                self._broken = True


class Serial:
    def __init__(self, output: SerialOutput, set_irq_level: Callable[[int], None]) -> None:
        self._output = output
        self._set_irq_level = set_irq_level
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._irq_level = 0
        self.ier = 0
        self.lcr = 0x03  # 8N1, as firmware leaves it
        self.mcr = MCR_OUT2
        self.scr = 0
        self.dll = 0x0C  # 9600 baud
        self.dlh = 0
        self.fifo_enabled = False
        self.thr_empty_pending = False

    # --- guest side ---------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            value = self._read_register(offset)
            self._update_irq()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._write_register(offset, value & 0xFF)
            self._update_irq()

    def _read_register(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == DATA:
            if dlab:
                return self.dll
            return self._rx.popleft() if self._rx else 0
        if offset == IER:
            return self.dlh if dlab else self.ier
        if offset == IIR:
            source = self._pending_source()
            if source == IIR_THR_EMPTY:
                self.thr_empty_pending = False  # reading IIR acknowledges THRE
            return source | (IIR_FIFO_ENABLED if self.fifo_enabled else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return LSR_THR_EMPTY | LSR_IDLE | (LSR_DATA_READY if self._rx else 0)
        if offset == MSR:
            return self._modem_status()
        return self.scr

    def _write_register(self, offset: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == DATA:
            if dlab:
                self.dll = value
                return
            if self.mcr & MCR_LOOP:
                self._receive(value)
            else:
                self._output.write_byte(value)
            self.thr_empty_pending = True
        elif offset == IER:
            if dlab:
                self.dlh = value
                return
            if value & IER_THR_EMPTY and not self.ier & IER_THR_EMPTY:
                self.thr_empty_pending = True  # enabling THRE with an empty THR interrupts at once
            self.ier = value & 0x0F
        elif offset == IIR:
            self.fifo_enabled = bool(value & FCR_ENABLE_FIFO)
            if value & FCR_CLEAR_RX:
                self._rx.clear()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value

    def _modem_status(self) -> int:
        if not self.mcr & MCR_LOOP:
            return DEFAULT_MSR
        # In loopback the modem outputs are wired back to the inputs.
        status = 0
        if self.mcr & MCR_DTR:
            status |= MSR_DSR
        if self.mcr & MCR_RTS:
            status |= MSR_CTS
        if self.mcr & MCR_OUT1:
            status |= MSR_RI
        if self.mcr & MCR_OUT2:
            status |= MSR_DCD
        return status

    def _pending_source(self) -> int:
        if self.ier & IER_RX_AVAILABLE and self._rx:
            return IIR_RX_AVAILABLE
        if self.ier & IER_THR_EMPTY and self.thr_empty_pending:
            return IIR_THR_EMPTY
        return IIR_NONE

    def _update_irq(self) -> None:
        level = 0 if self._pending_source() == IIR_NONE else 1
        if level != self._irq_level:
            self._irq_level = level
            self._set_irq_level(level)

    def _receive(self, value: int) -> None:
        if len(self._rx) < RX_FIFO_SIZE:
            self._rx.append(value)

    # --- host side ----------------------------------------------------------
    def feed_input(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes fit in the FIFO."""
        with self._lock:
            room = RX_FIFO_SIZE - len(self._rx)
            accepted = data[:room]
            self._rx.extend(accepted)
            self._update_irq()
        return len(accepted)

    def flush(self) -> None:
        self._output.flush()

    # --- persistence ----------------------------------------------------------
    def save(self) -> dict:
        with self._lock:
            return {
                "version": STATE_VERSION,
                "ier": self.ier,
                "lcr": self.lcr,
                "mcr": self.mcr,
                "scr": self.scr,
                "dll": self.dll,
                "dlh": self.dlh,
                "fifo_enabled": self.fifo_enabled,
                "thr_empty_pending": self.thr_empty_pending,
                "rx": bytes(self._rx),
                "irq_level": self._irq_level,
            }

    def restore(self, state: dict) -> None:
        state = upgraded("serial", state, STATE_VERSION)
        with self._lock:
            self.ier = state["ier"]
            self.lcr = state["lcr"]
            self.mcr = state["mcr"]
            self.scr = state["scr"]
            self.dll = state["dll"]
            self.dlh = state["dlh"]
            self.fifo_enabled = state["fifo_enabled"]
            self.thr_empty_pending = state["thr_empty_pending"]
            self._rx = deque(state["rx"])
            # The irqchip state restored alongside already holds this line's level.
            self._irq_level = state["irq_level"]
