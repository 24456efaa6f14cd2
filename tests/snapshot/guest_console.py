"""Reading the test guest's serial console (see guests/testguest/README.md)."""

from __future__ import annotations

import io
import re
import time

ROUND = re.compile(rb"^tg: cpu=(\d+) round=(\d+) dirtied=(\d+) verified=(\d+) ticks=(\d+)$", re.M)


def last_rounds(console: bytes) -> dict[int, int]:
    """The last round each CPU printed."""
    return {int(m.group(1)): int(m.group(2)) for m in ROUND.finditer(console)}


def rounds(console: bytes) -> list[tuple[int, int, int]]:
    """(cpu, round, verified pages) of every round line, in order."""
    return [(int(m.group(1)), int(m.group(2)), int(m.group(4))) for m in ROUND.finditer(console)]


def assert_healthy(console: bytes) -> None:
    assert b"VERIFY FAIL" not in console, console[-2000:]
    assert b"FAULT" not in console, console[-2000:]
    assert b"ERROR" not in console, console[-2000:]


def wait_for_rounds(out: io.BytesIO, cpus: int, count: int, timeout: float = 30.0) -> bytes:
    """Wait until every CPU printed `count` round lines with a full verification;
    returns the console so far."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        console = out.getvalue()
        assert_healthy(console)
        verified = [cpu for cpu, _, pages in rounds(console) if pages > 0]
        if all(verified.count(cpu) >= count for cpu in range(cpus)):
            return console
        time.sleep(0.01)
    raise AssertionError(f"fewer than {count} verified rounds per CPU in {timeout} s: {out.getvalue()[-1500:]!r}")
