"""Moving a VM as an operator runs it: `snapvisor run --api-sock` on host A,
`snapvisor receive` on host B, and `snapvisor migrate --api-sock --to B` asks the
VM to move itself. On success A's `run` exits 0 saying where the VM went and the
guest goes on on B; on failure the VM keeps running on A, served as before."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from migrate_lab import Host, Process, rounds, wait_for_verified_rounds
from snapvisor.control import ApiClient
from test_live_migration import PORT, QUIET, assert_continues, report, start_receiver, start_served

pytestmark = pytest.mark.kvm


def ask_to_migrate(a: Host, sock: Path, to: str, label: str = "migrate", *extra: str) -> Process:
    return a.run(label, ["migrate", "--api-sock", str(sock), "--to", to, *extra])


def last_round(process: Process) -> int:
    return max(number for _, number, _ in rounds(process.stdout()))


def assert_runs_on_a(vm: Process, sock: Path) -> None:
    """A's VM still runs, answers its API as Running, and its guest verifies more rounds."""
    assert ApiClient(sock, timeout=10).vm()["state"] == "Running"
    wait_for_verified_rounds(vm, 3, 60, after=last_round(vm))
    assert vm.popen.poll() is None


def test_a_vm_run_with_an_api_socket_moves_to_another_host(testguest: Path, hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    receiver = start_receiver(b)
    repo = a.workdir / "a-repo"
    vm, sock = start_served(a, testguest, "--snapshot-every", "1s", "--repo", str(repo))
    deadline = time.monotonic() + 60
    while not list((repo / "snapshots").glob("*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list((repo / "snapshots").glob("*")), f"no scheduled snapshot: {vm.stderr()}"

    mover = ask_to_migrate(a, sock, f"{b.address}:{PORT}", "migrate", "--json")
    assert mover.wait(120) == 0, mover.stderr()
    stats = json.loads(mover.stdout())
    assert vm.wait(30) == 0, vm.stderr()
    # A clean end: it says where the VM went, and the schedule stopped without a word.
    assert f"snapvisor: VM mover moved to {b.address}:{PORT}" in vm.stderr()
    assert "scheduled snapshot" not in vm.stderr() and "error" not in vm.stderr(), vm.stderr()
    assert not sock.exists()

    console_a = vm.stdout()
    console_b = wait_for_verified_rounds(receiver, 5, 60, after=last_round(vm))
    assert_continues(console_a, console_b)
    arrived = report(receiver)
    assert arrived["vm"] == "mover"
    assert arrived["downtime_s"] == pytest.approx(stats["downtime_s"], abs=1e-6)
    assert stats["rounds"] >= 1 and stats["pages"]["data"] >= 32 * 256
    assert receiver.popen.poll() is None, "the VM must keep running on B"


def test_failed_moves_leave_the_vm_running_and_a_sigterm_waits_for_a_move(
        testguest: Path, hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    to = f"{b.address}:{PORT}"
    a.limit("40mbit")  # the moves below last seconds: long enough to act in the middle of one
    vm, sock = start_served(a, testguest, cmdline=QUIET)

    # Nothing listens on B.
    refused = ask_to_migrate(a, sock, to, "refused")
    assert refused.wait(60) == 1, refused.stderr()
    assert f"error: migration to {to} failed, the VM keeps running on this host: cannot connect" in refused.stderr()
    assert_runs_on_a(vm, sock)

    # B dies in the middle.
    receiver = start_receiver(b, label="killed")
    cut = ask_to_migrate(a, sock, to, "cut")
    receiver.wait_for_stderr("migration from", 30)
    assert ApiClient(sock, timeout=10).vm()["state"] == "Migrating"
    receiver.signal(signal.SIGKILL)
    assert cut.wait(60) == 1, cut.stderr()
    assert "the VM keeps running on this host" in cut.stderr(), cut.stderr()
    assert "closed the connection in the middle of the migration" in cut.stderr(), cut.stderr()
    assert_runs_on_a(vm, sock)

    # A SIGTERM to A's `run` in the middle of a move lets the move finish: the VM
    # runs on B, and A exits as after any move.
    receiver = start_receiver(b, label="receiver")
    mover = ask_to_migrate(a, sock, to, "migrate")
    receiver.wait_for_stderr("migration from", 30)
    vm.signal(signal.SIGTERM)
    assert mover.wait(120) == 0, mover.stderr()
    assert vm.wait(30) == 0, vm.stderr()
    assert f"moved to {to}" in vm.stderr() and "VM stopped" not in vm.stderr(), vm.stderr()
    wait_for_verified_rounds(receiver, 3, 60, after=last_round(vm))
    assert receiver.popen.poll() is None
