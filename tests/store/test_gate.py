"""Gate: the snapshot writer's background tasks run only while it is open."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

from snapvisor.store.gate import Gate

DEADLINE_S = 10.0


def test_closing_waits_for_running_tasks_and_holds_new_ones() -> None:
    gate = Gate()
    started, release = threading.Event(), threading.Event()
    events: list[str] = []

    def running_task() -> None:
        started.set()
        assert release.wait(DEADLINE_S)
        events.append("running task finished")

    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(gate.run, running_task)
        assert started.wait(DEADLINE_S)
        # Let the task go a little after the close began: closing must wait for it.
        releaser = threading.Timer(0.1, release.set)
        releaser.start()
        with gate.closed():
            events.append("gate closed")
            second = pool.submit(gate.run, events.append, "new task ran")
            done, _ = wait([second], timeout=0.2)
            assert not done, "a task started while the gate was closed"
            events.append("gate opening")
        second.result(DEADLINE_S)
        first.result(DEADLINE_S)
        releaser.join()
    assert events == ["running task finished", "gate closed", "gate opening", "new task ran"]


def test_a_failing_task_raises_to_its_caller_and_is_not_counted_as_running() -> None:
    gate = Gate()

    def failing() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        gate.run(failing)
    with gate.closed():  # returns at once: nothing is left running
        pass
    assert gate.run(lambda: 42) == 42
