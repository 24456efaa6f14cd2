"""A gate for a snapshot writer's background work (hashing, compression, uploads).

While the VM is paused for a snapshot, every other thread of the VMM that wants the
GIL or a CPU lengthens the pause: the vCPU threads must wake up to park, the
snapshot thread copies and saves state. The writer's tasks can all wait until
the guest runs again, so the capture holds them back: closing the gate waits
(guest still running) for the tasks already running, and no new one starts until
it opens again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


class Gate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._running = 0

    def run(self, task: Callable[..., T], *args: object) -> T:
        """Run `task(*args)` once the gate is open (in a worker thread)."""
        with self._cond:
            self._cond.wait_for(lambda: self._open)
            self._running += 1
        try:
            return task(*args)
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextmanager
    def closed(self) -> Iterator[None]:
        """No task runs inside this block: those running finish first, new ones wait."""
        with self._cond:
            self._open = False
            self._cond.wait_for(lambda: self._running == 0)
        try:
            yield
        finally:
            with self._cond:
                self._open = True
                self._cond.notify_all()
