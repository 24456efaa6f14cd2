"""Debian's kernel snapshotted during its early boot and restored in a new process
prints exactly the lines an uninterrupted boot prints, up to the point where it
stops on this host (PVM: see shared/PLATFORM.md; on hardware KVM it boots on)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import snapvisor
from linux_console import comparable

pytestmark = [pytest.mark.slow, pytest.mark.kvm]
HERE = Path(__file__).parent
# panic=-1: where the kernel gets as far as mounting a root it does not have (on a
# hardware-style KVM), it resets at once instead of waiting out RUN_LIMIT_S.
CMDLINE = "console=ttyS0 earlyprintk=serial panic=-1"
RUN_LIMIT_S = 150


def run_until_stopped(vm: snapvisor.VM, out: io.BytesIO) -> bytes:
    status = vm.wait(RUN_LIMIT_S)
    if status is None:  # hardware KVM boots on: compare what both printed by now
        vm.stop()
    return out.getvalue()


def test_early_boot_snapshot_restores_to_the_same_output(debian_vmlinux: Path, tmp_path: Path) -> None:
    repo_url = str(tmp_path / "repo")
    out = io.BytesIO()
    vm = snapvisor.VM.boot(debian_vmlinux, mem="256M", cmdline=CMDLINE, serial_out=out, name="linux")
    try:
        deadline = time.monotonic() + RUN_LIMIT_S
        while b"Linux version" not in out.getvalue():
            assert time.monotonic() < deadline and vm.wait(0.1) is None, out.getvalue()[-2000:]
        # Pause first so the console position marks the instant the snapshot captures.
        vm.pause()
        printed_before = len(out.getvalue())
        info = vm.snapshot(repo_url)
        uninterrupted = run_until_stopped(vm, out)
    finally:
        vm.close()

    console_file = tmp_path / "restored-console"
    child = subprocess.run(
        [sys.executable, str(HERE / "restore_child.py"), repo_url, info.id, str(console_file), str(RUN_LIMIT_S)],
        capture_output=True, text=True, timeout=RUN_LIMIT_S + 60,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])),
    )
    assert child.returncode == 0, child.stderr[-3000:]
    restored = console_file.read_bytes()

    (expected, expected_audit), (got, got_audit) = comparable(uninterrupted[printed_before:]), comparable(restored)
    assert len(expected) > 10, uninterrupted[-2000:]  # the snapshot was taken early enough to matter
    differing = [(e, g) for e, g in zip(expected, got) if e != g]
    assert len(got) == len(expected) and not differing, (len(expected), len(got), differing)
    assert got_audit == expected_audit
