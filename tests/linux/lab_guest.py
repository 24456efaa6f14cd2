"""The lab's Linux guest run through the `snapvisor` command, and what its console says.

`scripts/lab` builds the guest (Debian's cloud kernel as an ELF vmlinux, an
initramfs, an ext4 root disk with the workload of guests/linux/workload) under
its cache and names the folder in SNAPVISOR_LAB_DIR when it runs the tests in L1.
The workload prints `WL rows=N` after each committed sqlite3 transaction of
`wl.batch` rows, `MEM round=R ok|MISMATCH` for its memory check, and
`WL done rows=N integrity=ok bad_sums=0` before it remounts its root read-only and
resets the guest, which ends snapvisor with status 0.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))

from cli_helpers import Foreground, wait_until  # noqa: E402

BATCH = 10
BOOT_TIMEOUT_S = 300  # L2 reaches its workload in 30-90 s in L1, slower while L1 is busy
ROWS = re.compile(rb"^WL rows=(\d+)\r?$", re.M)
DONE = re.compile(rb"^WL done rows=(\d+) integrity=(\S+) bad_sums=(\d+)\r?$", re.M)
ROOT_LINE = re.compile(rb"^GUEST root uptime=\S+ cpus=(\d+) disk=(\d+)s\r?$", re.M)
MEMORY_OK = re.compile(rb"^MEM round=\d+ ok\r?$", re.M)
ROOT_DISK_SECTORS = (128 << 20) // 512  # scripts/lab makes a 128 MiB image


@dataclass(frozen=True)
class LabGuest:
    vmlinux: Path
    initrd: Path
    root_image: Path


def lab_guest() -> LabGuest:
    """The guest scripts/lab built, or a skip that says how to run these tests."""
    folder = os.environ.get("SNAPVISOR_LAB_DIR")
    if not folder:
        pytest.skip("Linux guests need a hardware-style KVM: run these tests in the lab (scripts/lab test)")
    guest = LabGuest(Path(folder) / "guest-vmlinux", Path(folder) / "guest-initrd.gz", Path(folder) / "root.img")
    missing = [str(path) for path in vars(guest).values() if not path.is_file()]
    assert not missing, f"the lab's guest is incomplete (run scripts/lab build): {missing}"
    return guest


def cmdline(rows: int, pause_s: int) -> str:
    """The workload stops at `rows` rows, transactions `pause_s` apart; panic=-1 and
    reboot=k end a failed boot at once."""
    pace = f" wl.pause={pause_s}" if pause_s else ""
    return f"console=ttyS0 panic=-1 reboot=k quiet wl.rows={rows} wl.batch={BATCH}{pace}"


def rows(console: bytes) -> list[int]:
    return [int(n) for n in ROWS.findall(console)]


def text(console: bytes, lines: int = 40) -> str:
    return "\n".join(console.decode(errors="replace").splitlines()[-lines:])


class Guests:
    """The snapvisor processes of one test: any still running is killed when the test
    ends, and each one's console and stderr are written to the test's folder and, in
    the lab, to the job folder on the host (SNAPVISOR_LAB_JOB), which outlives L1."""

    def __init__(self, folder: Path, guest: LabGuest) -> None:
        self.folder = folder
        self.guest = guest
        self._running: dict[str, Foreground] = {}

    def start(self, label: str, *args: str, env: dict[str, str] | None = None) -> Foreground:
        process = Foreground(*args, env=env)
        self._running[label] = process
        return process

    def boot(self, label: str, *, vcpus: int = 1, target_rows: int, pause_s: int = 0,
             args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> tuple[Foreground, Path]:
        """Boots the guest on a fresh copy of the root disk and waits for its first
        committed rows. A boot that ends or hangs before the workload starts (a
        triple fault, say) is tried once more; a guest that reports a problem (no
        disk) is not. `pause_s` paces the workload: a transaction takes ~1 s in the
        lab, a snapshot through the CLI there tens of seconds."""
        disk = self.folder / f"{label}.img"
        for attempt in (1, 2):
            shutil.copyfile(self.guest.root_image, disk)
            name = label if attempt == 1 else f"{label}-retry"
            process = self.start(name, "run", "--kernel", str(self.guest.vmlinux), "--initrd", str(self.guest.initrd),
                                 "--mem", "512M", "--vcpus", str(vcpus), "--disk", str(disk),
                                 "--cmdline", cmdline(target_rows, pause_s), *args, env=env)
            deadline = time.monotonic() + BOOT_TIMEOUT_S
            while time.monotonic() < deadline and process.process.poll() is None:
                console = process.getvalue()
                if ROWS.search(console) or b"GUEST no disk" in console or b"GUEST cannot mount" in console:
                    break
                time.sleep(0.5)
            console = process.getvalue()
            if ROWS.search(console):
                return process, disk
            if b"GUEST no disk" in console or b"GUEST cannot mount" in console:
                break
            process.kill()
        raise AssertionError(f"the guest did not start its workload (console logs in {self.folder}):\n"
                             f"{text(process.getvalue())}\nstderr: {process.stderr[-2000:]}")

    def close(self) -> None:
        job = os.environ.get("SNAPVISOR_LAB_JOB")
        keep = [self.folder] + ([Path(job) / "consoles" / self.folder.name] if job else [])
        for label, process in self._running.items():
            process.kill()
            for folder in keep:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{label}.console").write_bytes(process.getvalue())
                (folder / f"{label}.stderr").write_text(process.stderr)


def wait_for_rows(process: Foreground, at_least: int, timeout: float) -> int:
    """The latest row count once it reaches `at_least`."""
    def reached() -> int | None:
        assert process.process.poll() is None, f"snapvisor exited {process.process.poll()}:\n{text(process.getvalue())}"
        seen = rows(process.getvalue())
        return seen[-1] if seen and seen[-1] >= at_least else None

    return wait_until(reached, timeout, f"{at_least} rows in the guest's database")


def stop(process: Foreground) -> int:
    """Ends a snapvisor process as an operator does (SIGTERM: the VM stops in order)."""
    process.process.terminate()
    return process.wait(120)


def wait_finished(process: Foreground, timeout: float) -> bytes:
    """Waits for the workload to finish and the guest to reset; returns its console."""
    try:
        status = process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the guest did not finish within {timeout} s:\n{text(process.getvalue())}") from None
    console = process.getvalue()
    assert status == 0, f"snapvisor exited {status}:\n{text(console)}\nstderr: {process.stderr[-2000:]}"
    return console


def assert_workload_sound(console: bytes, target_rows: int) -> None:
    """The database is whole and every row's checksum holds; the memory check never
    failed; the row counts went up one transaction at a time."""
    done = DONE.search(console)
    assert done, f"no `WL done` line:\n{text(console)}"
    count, integrity, bad_sums = int(done[1]), done[2].decode(), int(done[3])
    assert (integrity, bad_sums) == ("ok", 0), done[0]
    assert count >= target_rows
    assert b"MISMATCH" not in console and b"sqlite3 failed" not in console, text(console)
    assert_consecutive(rows(console))


def assert_no_kernel_complaint(console: bytes) -> None:
    """A restored or migrated guest must not notice its move: no soft lockup, RCU
    stall or BUG (its clock jumping by the time it was stopped makes the watchdogs
    report one)."""
    complaints = re.findall(rb"^.*(?:soft lockup|rcu_sched self-detected stall|rcu: INFO|BUG:).*$", console, re.M)
    assert not complaints, complaints


def assert_consecutive(counts: list[int]) -> None:
    steps = {later - earlier for earlier, later in zip(counts, counts[1:])}
    assert counts and steps <= {BATCH}, f"row counts not one transaction apart: {counts}"


def assert_fsck_clean(image: Path) -> None:
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, f"e2fsck -fn {image}: exit {check.returncode}\n{check.stdout}\n{check.stderr}"
