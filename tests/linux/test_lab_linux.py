"""Linux at work under snapvisor, in the lab (scripts/lab test; docs/lab.md).

Debian's cloud kernel boots from an initramfs onto an ext4 root disk on
virtio-blk, where Debian's sqlite3 commits checksummed rows in a loop beside a
memory check (guests/linux/workload). Each scenario asserts exactness: the guest
sees every CPU and its disk; after a snapshot, restore or migration the workload
carries on from the row count it had (never less, one transaction at a time),
`PRAGMA integrity_check` is ok, every checksum holds, and after the guest's own
shutdown `e2fsck -fn` finds its disk clean.
"""

from __future__ import annotations

import json
import secrets
import socket
from pathlib import Path

import pytest

from lab_guest import (  # first: it puts tests/cli (cli_helpers) on the path
    BATCH, MEMORY_OK, ROOT_DISK_SECTORS, ROOT_LINE, Guests, assert_consecutive, assert_fsck_clean,
    assert_no_kernel_complaint, assert_workload_sound,
    lab_guest, rows, stop, text, wait_finished, wait_for_rows,
)
from cli_helpers import s3_env, snapvisor, wait_for_api, wait_until  # noqa: E402

pytestmark = [pytest.mark.linux, pytest.mark.kvm]
FINISH_TIMEOUT_S = 600


@pytest.fixture
def guests(tmp_path: Path):
    running = Guests(tmp_path, lab_guest())
    yield running
    running.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def snapshot(sock: Path, repo: str, env: dict[str, str] | None = None) -> dict:
    done = snapvisor("snapshot", "--api-sock", str(sock), "--repo", repo, "--json", env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("vcpus", [1, 2])
def test_boot_sees_every_cpu_and_its_disk(guests: Guests, vcpus: int) -> None:
    target = 3 * BATCH
    guest, disk = guests.boot(f"boot-{vcpus}cpu", vcpus=vcpus, target_rows=target)
    console = wait_finished(guest, FINISH_TIMEOUT_S)
    seen = ROOT_LINE.search(console)
    assert seen, text(console)
    assert (int(seen[1]), int(seen[2])) == (vcpus, ROOT_DISK_SECTORS), seen[0]
    assert_workload_sound(console, target)
    assert MEMORY_OK.search(console), text(console)  # the memory check ran its rounds, not only started
    assert_fsck_clean(disk)


def test_snapshots_while_the_workload_runs_restore_eager_and_lazy(guests: Guests, tmp_path: Path) -> None:
    repo, sock = str(tmp_path / "repo"), tmp_path / "api.sock"
    target = 40 * BATCH
    original, _ = guests.boot("original", target_rows=target, pause_s=1,
                              args=("--api-sock", str(sock), "--name", "lab-sqlite"))
    wait_for_api(sock, original, timeout=120)
    # For each snapshot: the count the guest had printed before it was asked for (the
    # snapshot holds more) and the first one printed after it returned (the snapshot
    # holds at most one transaction before that).
    bounds = {}
    for kind, rows_before in (("full", 2 * BATCH), ("incremental", 5 * BATCH)):
        before = wait_for_rows(original, rows_before, 300)
        answer = snapshot(sock, repo)
        assert answer["full"] == (kind == "full"), answer
        after = wait_for_rows(original, before + BATCH, 300)
        bounds[kind] = (answer["id"], before + BATCH, after + BATCH)
    stop(original)

    for mode, kind in (("eager", "incremental"), ("lazy", "full")):
        snapshot_id, lowest, highest = bounds[kind]
        disk_dir = tmp_path / f"restored-{mode}"
        disk_dir.mkdir()
        restored = guests.start(f"restore-{mode}", "restore", "--repo", repo, "--disk-dir", str(disk_dir),
                                *(["--lazy"] if mode == "lazy" else []), snapshot_id)
        console = wait_finished(restored, FINISH_TIMEOUT_S)
        counts = rows(console)
        assert counts and lowest <= counts[0] <= highest, (mode, kind, lowest, highest, counts)
        assert_workload_sound(console, target)
        assert_fsck_clean(disk_dir / "vda.img")
        assert_no_kernel_complaint(console)


def test_live_migration_with_the_workload_running(guests: Guests, tmp_path: Path) -> None:
    sock, target = tmp_path / "api.sock", 30 * BATCH
    source, _ = guests.boot("source", target_rows=target, pause_s=1,
                            args=("--api-sock", str(sock), "--name", "lab-migrate"))
    wait_for_api(sock, source, timeout=120)
    address, arrived = f"127.0.0.1:{free_port()}", tmp_path / "arrived"
    arrived.mkdir()
    destination = guests.start("destination", "receive", "--listen", address, "--disk-dir", str(arrived))
    wait_until(lambda: "waiting for a migration" in destination.stderr, 120, "the receiver to listen")
    wait_for_rows(source, 3 * BATCH, 300)

    moved = snapvisor("migrate", "--api-sock", str(sock), "--to", address, "--json", timeout=300)
    assert moved.returncode == 0, moved.stderr
    assert source.wait(60) == 0, source.stderr
    console = wait_finished(destination, FINISH_TIMEOUT_S)
    # The console moves with the VM: the source's and the destination's output are one
    # stream, its row counts one transaction apart across the move.
    assert rows(console), text(console)
    assert_consecutive(rows(source.getvalue() + console))
    assert_workload_sound(source.getvalue() + console, target)
    assert_fsck_clean(arrived / "vda.img")
    assert_no_kernel_complaint(console)


@pytest.mark.s3
def test_scheduled_series_to_s3_restores_the_newest(guests: Guests, tmp_path: Path, s3_server, s3_bucket) -> None:
    env = s3_env(s3_server)
    repo = f"s3://{s3_bucket}/lab-{secrets.token_hex(3)}"
    target = 60 * BATCH
    original, _ = guests.boot("scheduled", target_rows=target, pause_s=1, env=env,
                              args=("--name", "lab-s3", "--snapshot-every", "10s", "--repo", repo, "--keep-last", "2"))

    def snapshots() -> list[dict]:
        listed = snapvisor("ls", "--repo", repo, "--json", env=env, timeout=120)
        if "no snapvisor repository at" in listed.stderr:
            return []  # the first scheduled snapshot creates it
        assert listed.returncode == 0, listed.stderr
        return json.loads(listed.stdout)

    def two_snapshots() -> list[dict] | None:
        assert original.process.poll() is None, f"the guest ended before two snapshots:\n{text(original.getvalue())}"
        found = snapshots()
        return found if len(found) >= 2 else None

    series = wait_until(two_snapshots, 400, "two scheduled snapshots", interval=2)
    newest = max(series, key=lambda entry: entry["time"])
    assert newest["kind"] == "incremental" and newest["disk_bytes"] > 0, series
    # the original runs on past the newest snapshot, so it prints the count the restored guest starts from
    shown = wait_for_rows(original, rows(original.getvalue())[-1] + BATCH, 300)
    stop(original)

    disk_dir = tmp_path / "restored"
    disk_dir.mkdir()
    restored = guests.start("restored", "restore", "--repo", repo, "--disk-dir", str(disk_dir), newest["id"], env=env)
    console = wait_finished(restored, FINISH_TIMEOUT_S)
    counts = rows(console)
    assert counts and counts[0] in rows(original.getvalue()) and counts[0] <= shown, (counts, rows(original.getvalue()))
    assert_workload_sound(console, target)
    assert_fsck_clean(disk_dir / "vda.img")
    assert_no_kernel_complaint(console)
