"""Cold move: host A snapshots its running guest (memory and disk) into the shared
S3 repository and is then lost (killed); host B, a separate process in another
namespace, restores the snapshot and the guest continues from it, verifying every
page and disk block it owns."""

from __future__ import annotations

import json
import secrets
import signal
from pathlib import Path

import pytest

from migrate_lab import Host, assert_healthy, rounds, wait_for_verified_rounds
from test_live_migration import DISK_ROUND, GUEST, new_disk

pytestmark = [pytest.mark.kvm, pytest.mark.s3]


def test_cold_move_through_s3(testguest: Path, hosts: tuple[Host, Host], shared_s3: dict, tmp_path: Path) -> None:
    a, b = hosts
    repo = f"s3://snapvisor-migrate/cold-{secrets.token_hex(4)}"
    sock = tmp_path / "a.sock"
    disk = new_disk(tmp_path / "a-disk.img")
    vm_a = a.run("vm-a", ["run", "--kernel", str(testguest), "--mem", "128M", "--cmdline", GUEST,
                          "--disk", str(disk), "--api-sock", str(sock), "--name", "cold"])
    wait_for_verified_rounds(vm_a, 3, 60)
    before = max(number for _, number, _ in rounds(vm_a.stdout()))
    snap = a.run("snapshot", ["snapshot", "--api-sock", str(sock), "--repo", repo, "--json"])
    assert snap.wait(120) == 0, snap.stderr()
    snapshot = json.loads(snap.stdout())
    after = max(number for _, number, _ in rounds(vm_a.stdout()))
    vm_a.signal(signal.SIGKILL)  # host A is lost; only the repository remains
    vm_a.wait(30)

    (tmp_path / "b-disks").mkdir()
    vm_b = b.run("vm-b", ["restore", "--repo", repo, snapshot["id"], "--disk-dir", str(tmp_path / "b-disks")])
    console_b = wait_for_verified_rounds(vm_b, 5, 90)
    assert b"snapvisor-testguest" not in console_b, "B booted the guest instead of continuing it"
    first_on_b = min(number for _, number, _ in rounds(console_b))
    # The guest continues from the instant of the snapshot, not from zero.
    assert before < first_on_b <= after + 1, (before, first_on_b, after)
    assert_healthy(console_b)
    assert snapshot["vm"] == "cold"
    # The disk came along through the repository: B's guest reads back every block it wrote on A.
    disk_rounds = [int(m.group(2)) for m in DISK_ROUND.finditer(console_b)]
    assert len(disk_rounds) >= 2 and all(verified == 512 for verified in disk_rounds), console_b[-1000:]
