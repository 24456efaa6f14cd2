"""Boots the guest the way the side-by-side benchmarks do: QEMU (TCG) -kernel via
Multiboot, then checks the output protocol documented in guests/testguest/README.md."""

import re
import shutil
import subprocess

import pytest

from _guest_elf import guest_elf_path  # noqa: F401 (fixture)

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")

ROUND = re.compile(r"tg: cpu=(\d+) round=(\d+) dirtied=(\d+) verified=(\d+) ticks=(\d+)$")


def boot(elf, cmdline, mem_mib=64):
    """Run to power-off; returns (guest exit status, tg lines)."""
    proc = subprocess.run(
        [QEMU, "-accel", "tcg", "-m", str(mem_mib), "-nographic", "-no-reboot",
         "-monitor", "none", "-serial", "stdio",
         "-device", "isa-debug-exit,iobase=0x501,iosize=1",
         "-kernel", str(elf), "-append", cmdline],
        capture_output=True, text=True, timeout=120, check=False,
    )
    # isa-debug-exit makes QEMU exit with (status << 1) | 1
    assert proc.returncode & 1, f"QEMU did not exit through the power-off port:\n{proc.stdout}"
    # the firmware prints before the guest, without a newline
    lines = re.findall(r"tg: [^\r\n]*", proc.stdout)
    return proc.returncode >> 1, lines


def test_rounds_then_done_with_chosen_exit_status(guest_elf_path):
    status, lines = boot(guest_elf_path, "console=ttyS0 tg.mem=8 tg.seed=0x2a tg.rounds=3 tg.exit=9")
    assert lines[0] == "tg: snapvisor-testguest 1 cpus=1 mem=8 seed=42"
    assert lines[1] == "tg: timer ok"
    rounds = [ROUND.match(l).groups() for l in lines[2:-1]]
    assert [(int(c), int(r), int(d), int(v)) for c, r, d, v, _t in rounds] == [
        (0, r, 2048, 2048) for r in range(4)
    ]
    ticks = [int(t) for *_x, t in rounds]
    assert ticks == sorted(ticks) and ticks[-1] > 0
    assert lines[-1] == "tg: done" and status == 9


def test_partial_rounds_and_sparse_verification(guest_elf_path):
    status, lines = boot(guest_elf_path, "tg.mem=4 tg.pages=100 tg.rounds=4 tg.verify=2 tg.rate=100")
    rounds = [ROUND.match(l).groups()[1:4] for l in lines if ROUND.match(l)]
    assert rounds == [("0", "1024", "1024"), ("1", "100", "0"), ("2", "100", "1024"),
                      ("3", "100", "0"), ("4", "100", "1024")]
    assert lines[-1] == "tg: done" and status == 0


def test_corrupted_page_is_reported_and_powers_off_with_3(guest_elf_path):
    status, lines = boot(guest_elf_path, "tg.mem=4 tg.rounds=5 tg.corrupt=2")
    fail = re.fullmatch(
        r"tg: VERIFY FAIL cpu=0 page=0 seq=3 offset=4088 expected=0x([0-9a-f]+) got=0x([0-9a-f]+)",
        lines[-1],
    )
    assert fail, lines[-1]
    assert int(fail.group(1), 16) ^ int(fail.group(2), 16) == 1
    assert status == 3


def test_working_set_larger_than_ram_is_refused(guest_elf_path):
    status, lines = boot(guest_elf_path, "tg.mem=100", mem_mib=64)
    assert lines[-1].startswith("tg: ERROR not enough RAM for tg.mem=100")
    assert status == 5


def test_missing_cpus_are_reported_instead_of_hanging(guest_elf_path):
    # QEMU's Multiboot path starts one CPU only
    status, lines = boot(guest_elf_path, "tg.mem=4 tg.cpus=2")
    assert lines[-1] == "tg: ERROR only started=1 of tg.cpus=2"
    assert status == 5
