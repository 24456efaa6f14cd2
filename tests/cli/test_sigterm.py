"""SIGTERM (systemd, docker stop, kill) is handled as Ctrl-C is: the VM stops in
order, the API socket goes, the scheduler stops and its repository locks are
released, and the command exits 143 within moments. A migration that got under
way is not cut: it goes through, and the guest runs on the receiving host."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from cli_helpers import GUEST_CMDLINE, Foreground, rounds, wait_for_api, wait_for_guest, wait_until

pytestmark = pytest.mark.kvm


def terminate(process: Foreground, within: float = 5) -> int:
    """SIGTERM; the exit status, which must come within `within` seconds."""
    sent = time.monotonic()
    process.process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(30)
    finally:
        process.kill()
    assert time.monotonic() - sent < within, f"took {time.monotonic() - sent:.1f} s to exit: {process.stderr}"
    return code


def test_run_and_restore_stop_in_order_on_sigterm(testguest: Path, tmp_path: Path) -> None:
    sock, repo = tmp_path / "api.sock", tmp_path / "repo"
    run = Foreground("run", "--kernel", str(testguest), "--mem", "64M", "--cmdline", GUEST_CMDLINE,
                     "--api-sock", str(sock), "--snapshot-every", "1s", "--repo", str(repo))
    wait_for_api(sock, run)
    wait_until(lambda: list((repo / "snapshots").glob("*")), 60, "a scheduled snapshot")
    assert terminate(run) == 143, run.stderr
    assert not sock.exists()
    assert "terminated, VM stopped" in run.stderr and "Traceback" not in run.stderr
    assert not [lock for lock in (repo / "locks").rglob("*") if lock.is_file()]

    snapshot_id = next((repo / "snapshots").glob("*")).name
    restored = Foreground("restore", "--repo", str(repo), snapshot_id, "--api-sock", str(sock))
    wait_for_api(sock, restored)
    assert terminate(restored) == 143, restored.stderr
    assert not sock.exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_receive_stops_waiting_on_sigterm() -> None:
    waiting = Foreground("receive", "--listen", f"127.0.0.1:{free_port()}")
    wait_until(lambda: "waiting for a migration" in waiting.stderr, 30, "the receiver to listen")
    assert terminate(waiting) == 143, waiting.stderr


@pytest.mark.parametrize("side", ["sender", "receiver"])
def test_a_migration_under_way_goes_through(testguest: Path, side: str) -> None:
    """SIGTERM to either side mid-migration: the guest still moves (the sender exits
    0); on the receiver it then stops in order."""
    address = f"127.0.0.1:{free_port()}"
    receiver = Foreground("receive", "--listen", address, "--timeout", "5s")
    wait_until(lambda: "waiting for a migration" in receiver.stderr, 30, "the receiver to listen")
    # 128 MiB to move: the migration lasts long enough for a SIGTERM to land in it.
    sender = Foreground("migrate", "--to", address, "--kernel", str(testguest), "--mem", "256M",
                        "--cmdline", GUEST_CMDLINE.replace("tg.mem=8", "tg.mem=128"), "--on-signal",
                        "--timeout", "5s")
    try:
        wait_for_guest(sender, 1)
        sender.process.send_signal(signal.SIGUSR1)
        wait_until(lambda: "migration from" in receiver.stderr, 30, "the migration to start", interval=0.005)
        (sender if side == "sender" else receiver).process.send_signal(signal.SIGTERM)
        assert sender.wait(30) == 0, sender.stderr
        assert "migrated to" in sender.stderr
        wait_until(lambda: "migrated in and resumed" in receiver.stderr, 30, "the guest to resume on the receiver")
        if side == "sender":
            moved = len(rounds(receiver.getvalue()))
            wait_until(lambda: len(rounds(receiver.getvalue())) > moved, 30, "the moved guest to run on")
            assert terminate(receiver) == 143, receiver.stderr
        else:
            assert receiver.wait(30) == 143, receiver.stderr
        assert "terminated, VM stopped" in receiver.stderr
    finally:
        sender.kill()
        receiver.kill()
