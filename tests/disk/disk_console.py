"""The test guest's disk workload (guests/testguest/README.md, tg.disk) from the
console side. Module name unique: every test directory is on sys.path."""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

DISK_ROUND = re.compile(rb"^tg: disk round=(\d+) written=(\d+) verified=(\d+) ticks=(\d+)$", re.M)
DISK_BLOCKS = 256
# ~20 rounds a second: 64 pages of memory at 10 MiB/s, then 8 disk blocks
# written and the first 256 blocks (1 MiB) of the disk read back and checked.
CMDLINE = f"console=ttyS0 tg.mem=4 tg.rate=10 tg.pages=64 tg.rounds=0 tg.disk=1 tg.diskblocks={DISK_BLOCKS} tg.diskwrites=8"


def disk_rounds(console: bytes) -> list[tuple[int, int, int]]:
    """(round, blocks written, blocks verified) of every disk round line."""
    return [(int(m.group(1)), int(m.group(2)), int(m.group(3))) for m in DISK_ROUND.finditer(console)]


def assert_healthy(console: bytes) -> None:
    for bad in (b"VERIFY FAIL", b"FAULT", b"ERROR", b"DISK FAIL"):
        assert bad not in console, console[-2000:]


def wait_for_disk_rounds(out: io.BytesIO, count: int, timeout: float = 30.0) -> bytes:
    """Wait for `count` more disk rounds that verified every block; the console so far."""
    start = len(disk_rounds(out.getvalue()))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        console = out.getvalue()
        assert_healthy(console)
        if sum(1 for _, _, verified in disk_rounds(console)[start:] if verified == DISK_BLOCKS) >= count:
            return console
        time.sleep(0.01)
    raise AssertionError(f"fewer than {count} disk rounds in {timeout} s: {out.getvalue()[-1500:]!r}")


def snapshot_of_running_guest(guest: Path, repo, image: Path, rounds: int, cmdline: str = CMDLINE):
    """Boot `guest` with `image` as its disk, snapshot it into `repo` once `rounds`
    verified disk rounds ran, stop it; the SnapshotInfo."""
    import snapvisor

    out = io.BytesIO()
    vm = snapvisor.VM.boot(guest, mem="32M", cmdline=cmdline, serial_out=out, disks=[image])
    try:
        wait_for_disk_rounds(out, rounds)
        return vm.snapshot(repo)
    finally:
        vm.stop()
        vm.close()


def blank_image(path: Path, size: int) -> Path:
    """A sparse, all-zero raw image."""
    with path.open("wb") as file:
        file.truncate(size)
    return path


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512
