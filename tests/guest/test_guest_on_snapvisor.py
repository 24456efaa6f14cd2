"""Boots the guest on snapvisor's own VMM and /dev/kvm (on PVM hosts, ring 0 runs
in KVM's instruction emulator: this is where unsupported instructions would show)."""

import os
import re
import subprocess
import sys

import pytest

from _guest_elf import guest_elf_path  # noqa: F401 (fixture)

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"),
]

ROUND = re.compile(r"tg: cpu=(\d+) round=(\d+) dirtied=(\d+) verified=(\d+) ticks=(\d+)")


def run(elf, cmdline, vcpus=1, mem="64M"):
    proc = subprocess.run(
        [sys.executable, "-m", "snapvisor", "run", "--kernel", str(elf), "--cmdline", cmdline,
         "--mem", mem, "--vcpus", str(vcpus)],
        capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stdout.splitlines(), proc.stderr


def test_one_cpu_runs_its_rounds_and_powers_off_with_tg_exit(guest_elf_path):
    status, lines, err = run(guest_elf_path, "console=ttyS0 tg.mem=8 tg.rounds=2 tg.exit=6 tg.ticks=5")
    assert status == 6, err
    assert lines[0] == "tg: snapvisor-testguest 1 cpus=1 mem=8 seed=1"
    assert lines[1] == "tg: timer ok"
    rounds = [m.groups()[:4] for m in map(ROUND.fullmatch, lines) if m]
    assert rounds == [("0", str(r), "2048", "2048") for r in range(3)]
    assert any(re.fullmatch(r"tg: ticks=\d+", l) for l in lines)
    assert lines[-1] == "tg: done"


def test_two_cpus_share_the_working_set_at_the_chosen_rate(guest_elf_path):
    # 4 MiB per CPU per round at 40 MiB/s: at least ~100 ms (ticks) per round.
    status, lines, err = run(guest_elf_path, "tg.mem=8 tg.cpus=2 tg.rate=40 tg.rounds=2", vcpus=2)
    assert status == 0, err
    per_cpu = {}
    for m in map(ROUND.fullmatch, lines):
        if m:
            cpu, rnd, dirtied, verified, ticks = map(int, m.groups())
            assert dirtied == verified == 1024
            per_cpu.setdefault(cpu, []).append((rnd, ticks))
    assert sorted(per_cpu) == [0, 1]
    for rounds in per_cpu.values():
        assert [r for r, _t in rounds] == [0, 1, 2]
        gaps = [b[1] - a[1] for a, b in zip(rounds, rounds[1:])]
        assert all(g >= 95 for g in gaps), gaps
    assert lines[-1] == "tg: done"


def test_verify_failure_is_reported_on_kvm(guest_elf_path):
    status, lines, err = run(guest_elf_path, "tg.mem=4 tg.corrupt=1")
    assert status == 3, err
    assert re.fullmatch(r"tg: VERIFY FAIL cpu=0 page=0 seq=2 offset=4088 expected=0x[0-9a-f]+ got=0x[0-9a-f]+",
                        lines[-1])
