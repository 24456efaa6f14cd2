"""Auto-converge: slow a guest that dirties memory faster than the link carries it,
by pausing it for a growing share of every short period (QEMU's cpu-throttle idea:
start at 20 %, add 10 % a step, at most 99 %)."""

from __future__ import annotations

import threading

from snapvisor.vmm.vm import Vm

PERIOD_S = 0.010
FIRST_STEP = 0.20
STEP = 0.10
MAX_SHARE = 0.99


class Throttle:
    def __init__(self, vm: Vm) -> None:
        self._vm = vm
        self.share = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def step_up(self) -> None:
        """Pause the guest for a larger share of each period; starts the throttle."""
        self.share = min(MAX_SHARE, FIRST_STEP if self.share == 0 else self.share + STEP)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="migrate-throttle", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.wait((1 - self.share) * PERIOD_S):
                self._vm.pause()
                try:
                    self._stop.wait(self.share * PERIOD_S)
                finally:
                    self._vm.resume()
        except BaseException as exc:  # the VM exited under us; the migration loop reports it
            self.error = exc

    def stop(self) -> None:
        """Leave the guest running at full speed again."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
