"""Live migration between two hosts (network namespaces), each its own snapvisor
process: the test guest keeps dirtying memory and verifying every page it owns,
and its console continues on B exactly where A's stopped."""

from __future__ import annotations

import json
import re
import secrets
import signal
from pathlib import Path

import pytest

from migrate_lab import Host, Process, assert_healthy, rounds, wait_for_verified_rounds

pytestmark = pytest.mark.kvm

# 32 MiB working set, 2 MiB re-dirtied per round at 20 MiB/s: ~10 rounds a second,
# each followed by a check of every page; and 16 disk blocks written per round,
# all 512 read back and checked.
GUEST = "console=ttyS0 tg.mem=32 tg.rate=20 tg.pages=512 tg.rounds=0 tg.disk=1 tg.diskblocks=512 tg.diskwrites=16"
DISK_ROUND = re.compile(rb"^tg: disk round=(\d+) written=\d+ verified=(\d+)", re.M)
PORT = 7000
# Plaintext between the lab's hosts (private addresses); test_migration_tls.py covers TLS.
INSECURE = ("--insecure",)


def new_disk(path: Path, size: int = 8 << 20) -> Path:
    """A sparse raw image: the test guest needs its first blocks zero."""
    with open(path, "wb") as image:
        image.truncate(size)
    return path


def report(process: Process) -> dict:
    """The JSON line a `--json` migrate/receive printed on stderr."""
    for line in reversed(process.stderr().splitlines()):
        if line.startswith("snapvisor: {"):
            return json.loads(line.removeprefix("snapvisor: "))
    raise AssertionError(f"{process.label} printed no JSON report: {process.stderr()}")


def start_receiver(b: Host, *extra: str, label: str = "receiver", security: tuple[str, ...] = INSECURE) -> Process:
    """`receive --json` on B, its disks into an empty directory of its own (the
    hosts share no files), once it listens; `security`: its --tls-* or --insecure flags."""
    disks = b.workdir / f"{label}-disks"
    disks.mkdir()
    receiver = b.run(label, ["receive", "--listen", f"{b.address}:{PORT}", "--json", "--timeout", "3s",
                             "--disk-dir", str(disks), *security, *extra])
    receiver.wait_for_stderr("waiting for a migration", 30)
    return receiver


def start_served(a: Host, guest: Path, *extra: str, cmdline: str = GUEST,
                 security: tuple[str, ...] = INSECURE) -> tuple[Process, Path]:
    """`run --api-sock` on A with a disk, as an operator runs a VM, once its guest
    has verified a few rounds; the process and its API socket. `security`: the
    --tls-* or --insecure flags its migrations use."""
    sock = a.workdir / "a.sock"
    vm = a.run("vm", ["run", "--kernel", str(guest), "--mem", "128M", "--cmdline", cmdline,
                      "--disk", str(new_disk(a.workdir / "a-disk.img")), "--api-sock", str(sock), "--name", "mover",
                      *security, *extra])
    wait_for_verified_rounds(vm, 3, 60)
    return vm, sock


def start_pair(a: Host, b: Host, guest: Path, *extra_a: str) -> tuple[Process, Process]:
    """`receive` on B and `migrate --on-signal` on A, with a disk on A."""
    receiver = start_receiver(b)
    disk = new_disk(a.workdir / "a-disk.img")
    sender = a.run("sender", ["migrate", "--to", f"{b.address}:{PORT}", "--kernel", str(guest), "--mem", "128M",
                              "--cmdline", GUEST, "--disk", str(disk), "--on-signal", "--json", "--timeout", "3s",
                              "--name", "mover", *INSECURE, *extra_a])
    return sender, receiver


def assert_continues(console_a: bytes, console_b: bytes) -> None:
    """B's console goes on from A's: together they show every round exactly once,
    in order (a line cut by the pause is finished on B)."""
    assert b"snapvisor-testguest" not in console_b, "B booted the guest again instead of continuing it"
    numbers = [number for _, number, _ in rounds(console_a + console_b)]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
    assert_healthy(console_a + console_b)
    # The disk moved too: B's guest goes on writing it and reading back every block.
    disk_rounds = [(int(m.group(1)), int(m.group(2))) for m in DISK_ROUND.finditer(console_b)]
    assert len(disk_rounds) >= 2 and all(verified == 512 for _, verified in disk_rounds), console_b[-1000:]


def test_live_migration_moves_a_running_guest(testguest: Path, hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    sender, receiver = start_pair(a, b, testguest)
    wait_for_verified_rounds(sender, 3, 60)
    sender.signal(signal.SIGUSR1)
    assert sender.wait(60) == 0, sender.stderr()
    stats = report(sender)
    console_a = sender.stdout()
    last_on_a = max(number for _, number, _ in rounds(console_a))
    console_b = wait_for_verified_rounds(receiver, 5, 60, after=last_on_a)
    assert_continues(console_a, console_b)

    arrived = report(receiver)
    assert arrived["vm"] == "mover"
    # Both sides measured the same interval on the same CLOCK_MONOTONIC.
    assert arrived["downtime_s"] == pytest.approx(stats["downtime_s"], abs=1e-6)
    # A sanity bound only (this is a test on a shared machine; bench/migrate.py measures).
    assert 0 < stats["downtime_s"] < 5.0, stats
    assert stats["rounds"] >= 1 and stats["pages"]["data"] >= 32 * 256
    # Zero pages and pages the receiver already holds are not sent: far less than 128 MiB.
    assert stats["bytes_sent"] < 64 << 20, stats
    assert receiver.popen.poll() is None, "the VM must keep running on B"
    assert (b.workdir / "receiver-disks" / "vda.img").stat().st_size == 8 << 20


# A quieter guest (2 MiB/s): most pages stay as a snapshot saw them, and it
# converges over a slow link.
QUIET = "console=ttyS0 tg.mem=32 tg.rate=2 tg.pages=64 tg.rounds=0 tg.disk=1 tg.diskblocks=512 tg.diskwrites=2"


@pytest.mark.s3
@pytest.mark.parametrize("encryption", ["plain", "encrypted"])
def test_pages_of_the_last_snapshot_come_from_the_shared_repository(
        testguest: Path, hosts: tuple[Host, Host], shared_s3: dict, encryption: str, monkeypatch,
        tmp_path: Path) -> None:
    """Also through an encrypted repository (both hosts hold the password; the
    sender names guest pages with the repository's id key)."""
    if encryption == "encrypted":
        (tmp_path / "password").write_text("shared by both hosts\n")
        monkeypatch.setenv("SNAPVISOR_PASSWORD_FILE", str(tmp_path / "password"))
    a, b = hosts
    repo = f"s3://snapvisor-migrate/live-{secrets.token_hex(4)}"
    receiver = start_receiver(b, "--repo", repo)
    vm, sock = start_served(a, testguest, cmdline=QUIET)
    snap = a.run("snapshot", ["snapshot", "--api-sock", str(sock), "--repo", repo, "--json"])
    assert snap.wait(120) == 0, snap.stderr()
    mover = a.run("migrate", ["migrate", "--api-sock", str(sock), "--to", f"{b.address}:{PORT}", "--repo", repo,
                              "--json"])
    assert mover.wait(120) == 0, mover.stderr()
    assert vm.wait(30) == 0, vm.stderr()
    stats = json.loads(mover.stdout())
    console_a = vm.stdout()
    last_on_a = max(number for _, number, _ in rounds(console_a))
    console_b = wait_for_verified_rounds(receiver, 3, 60, after=last_on_a)
    assert_continues(console_a, console_b)

    assert stats["base_used"], stats
    pages = stats["pages"]
    # Most of the 8192 working-set pages were read by B from S3, not sent over the link.
    assert pages["base"] > pages["data"] and pages["base"] > 4096, pages
    assert stats["bytes_sent"] < 16 << 20, stats
