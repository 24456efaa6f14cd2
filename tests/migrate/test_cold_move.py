"""Cold move: host A snapshots its running guest into the shared S3 repository and
is then lost (killed); host B, a separate process in another namespace, restores
the snapshot and the guest continues from it, verifying every page it owns."""

from __future__ import annotations

import json
import secrets
import signal
from pathlib import Path

import pytest

from migrate_lab import Host, assert_healthy, rounds, wait_for_verified_rounds

pytestmark = [pytest.mark.kvm, pytest.mark.s3]

GUEST = "console=ttyS0 tg.mem=32 tg.rate=20 tg.pages=512 tg.rounds=0"


def test_cold_move_through_s3(testguest: Path, hosts: tuple[Host, Host], shared_s3: dict, tmp_path: Path) -> None:
    a, b = hosts
    repo = f"s3://snapvisor-migrate/cold-{secrets.token_hex(4)}"
    sock = tmp_path / "a.sock"
    vm_a = a.run("vm-a", ["run", "--kernel", str(testguest), "--mem", "128M", "--cmdline", GUEST,
                          "--api-sock", str(sock), "--name", "cold"])
    wait_for_verified_rounds(vm_a, 3, 60)
    before = max(number for _, number, _ in rounds(vm_a.stdout()))
    snap = a.run("snapshot", ["snapshot", "--api-sock", str(sock), "--repo", repo, "--json"])
    assert snap.wait(120) == 0, snap.stderr()
    snapshot = json.loads(snap.stdout())
    after = max(number for _, number, _ in rounds(vm_a.stdout()))
    vm_a.signal(signal.SIGKILL)  # host A is lost; only the repository remains
    vm_a.wait(30)

    vm_b = b.run("vm-b", ["restore", "--repo", repo, snapshot["id"]])
    console_b = wait_for_verified_rounds(vm_b, 5, 90)
    assert b"snapvisor-testguest" not in console_b, "B booted the guest instead of continuing it"
    first_on_b = min(number for _, number, _ in rounds(console_b))
    # The guest continues from the instant of the snapshot, not from zero.
    assert before < first_on_b <= after + 1, (before, first_on_b, after)
    assert_healthy(console_b)
    assert snapshot["vm"] == "cold"
