"""A migration that fails before B resumes leaves the VM running on A, intact, with
an error that says what happened: the link cut, B killed, a guest that dirties
memory faster than the link carries it. A killed before B resumed leaves nothing
running on B."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from migrate_lab import Host, Process, rounds, wait_for_verified_rounds
from test_live_migration import GUEST, PORT, new_disk, report

pytestmark = pytest.mark.kvm


def start_slow_migration(a: Host, b: Host, guest: Path, cmdline: str = GUEST, rate: str = "20mbit",
                         *extra: str) -> tuple[Process, Process]:
    """A migration over a link shaped to `rate`, already in its first round."""
    a.limit(rate)
    (b.workdir / "b-disks").mkdir()
    receiver = b.run("receiver", ["receive", "--listen", f"{b.address}:{PORT}", "--timeout", "3s", "--insecure",
                                  "--disk-dir", str(b.workdir / "b-disks")])
    receiver.wait_for_stderr("waiting for a migration", 30)
    sender = a.run("sender", ["migrate", "--to", f"{b.address}:{PORT}", "--kernel", str(guest), "--mem", "128M",
                              "--insecure",
                              "--cmdline", cmdline, "--disk", str(new_disk(a.workdir / "a-disk.img")),
                              "--on-signal", "--timeout", "3s", *extra])
    wait_for_verified_rounds(sender, 2, 60)
    sender.signal(signal.SIGUSR1)
    receiver.wait_for_stderr("migration from", 30)
    return sender, receiver


def assert_runs_on_a(sender: Process, error: str) -> None:
    """A reported `error` and its guest goes on verifying every page."""
    err = sender.wait_for_stderr("the VM keeps running on this host", 30)
    assert error in err, err
    last = max(number for _, number, _ in rounds(sender.stdout()))
    wait_for_verified_rounds(sender, 3, 60, after=last)
    assert sender.popen.poll() is None


def assert_nothing_ran_on_b(receiver: Process, error: str) -> None:
    """B refused with `error`, ran no guest, and left no half-received disk behind."""
    assert receiver.wait(30) != 0
    assert error in receiver.stderr(), receiver.stderr()
    assert receiver.stdout() == b"", "the guest must not have run on B"
    assert not any((receiver.stdout_path.parent / "b-disks").iterdir())


def test_link_cut_during_precopy(testguest: Path, hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    sender, receiver = start_slow_migration(a, b, testguest)
    a.cut()
    # Sending stalls, or the answer A waits for never comes: either way after --timeout.
    assert_runs_on_a(sender, " for 3 s")
    assert_nothing_ran_on_b(receiver, "nothing from")


def test_receiver_killed(testguest: Path, hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    sender, receiver = start_slow_migration(a, b, testguest)
    receiver.signal(signal.SIGKILL)
    assert_runs_on_a(sender, "closed the connection in the middle of the migration")


def test_sender_killed(testguest: Path, hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    sender, receiver = start_slow_migration(a, b, testguest)
    sender.signal(signal.SIGKILL)
    assert_nothing_ran_on_b(receiver, "closed the connection in the middle of the migration")


def test_guest_faster_than_link_ends_cleanly(testguest: Path, hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    # The guest rewrites all of its 8 MiB as fast as it can; the link carries 2 MB/s.
    hungry = "console=ttyS0 tg.mem=8 tg.rate=0 tg.pages=2048 tg.rounds=0 tg.disk=1"
    sender, receiver = start_slow_migration(a, b, testguest, hungry, "16mbit", "--max-time", "5s")
    assert_runs_on_a(sender, "did not converge")
    assert "throttled to" in sender.stderr()
    assert_nothing_ran_on_b(receiver, "gave up: pre-copy did not converge")


def test_throttle_lets_a_busy_guest_converge(testguest: Path, hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    # A compute-bound guest: it rewrites pages of its 2 MiB as fast as its CPU time
    # allows (~6 MB/s here, more on faster machines); the link carries 2 MB/s. It
    # cannot converge at full speed, and does once auto-converge slows the guest
    # down. (A guest paced by the clock, tg.rate, would not slow down: a 1 % CPU
    # share still covers a few MiB/s.)
    busy = "console=ttyS0 tg.mem=2 tg.work=200000 tg.pages=256 tg.rounds=0"
    sender, receiver = start_slow_migration(a, b, testguest, busy, "16mbit", "--max-time", "50s", "--json")
    try:
        status = sender.wait(70)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the migration did not end: {sender.stderr()}") from None
    assert status == 0, sender.stderr()
    stats = report(sender)
    assert stats["throttle_share"] >= 0.2, stats
    last = max(number for _, number, _ in rounds(sender.stdout()))
    console_b = wait_for_verified_rounds(receiver, 3, 60, after=last)
    assert b"snapvisor-testguest" not in console_b
