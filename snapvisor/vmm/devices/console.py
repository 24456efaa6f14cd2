"""Host input for the serial port: a thread that reads the host's stdin (or any
fd / binary file) and feeds the UART's receive FIFO."""

from __future__ import annotations

import os
import select
import threading
import time
from typing import BinaryIO

from snapvisor.vmm.devices.serial import Serial

POLL_INTERVAL_S = 0.1
READ_CHUNK = 64


class SerialInputPump:
    def __init__(self, source: BinaryIO | int, serial: Serial) -> None:
        self._fd = source if isinstance(source, int) else source.fileno()
        self._serial = serial
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="serial-input", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * POLL_INTERVAL_S)

    def _pump(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self._fd], [], [], POLL_INTERVAL_S)
            if not readable:
                continue
            try:
                data = os.read(self._fd, READ_CHUNK)
            except OSError:
                return
            if not data:
                return  # end of input
            while data and not self._stop.is_set():
                accepted = self._serial.feed_input(data)
                data = data[accepted:]
                if data:
                    time.sleep(0.001)  # the guest has not drained its FIFO yet
