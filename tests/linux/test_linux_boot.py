"""Debian's stock cloud kernel on real /dev/kvm, through both loaders.

On a PVM host (see shared/PLATFORM.md) ring-0 code is emulated, so Linux only
gets through early boot: the test waits for the `Linux version` banner and for
the kernel echoing the command line it was given, then stops the VM. On
hardware KVM the same kernel gets there in well under a second.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from snapvisor.vmm.builder import VmConfig, build_microvm_for_boot

pytestmark = [pytest.mark.slow, pytest.mark.kvm]
MARKER = "snapvisor.test=marker-7d1f"
CMDLINE = f"console=ttyS0 earlyprintk=serial {MARKER}"


def boot_until_cmdline_echo(kernel: Path, timeout: float) -> str:
    out = io.BytesIO()
    with build_microvm_for_boot(VmConfig(kernel=kernel, cmdline=CMDLINE, mem_size=256 << 20, serial_out=out)) as vm:
        vm.start()
        deadline = time.monotonic() + timeout
        echo = f"Kernel command line: {CMDLINE}".encode()
        while echo not in out.getvalue() and time.monotonic() < deadline:
            status = vm.wait(0.2)
            assert status is None, f"the kernel stopped early: {status}\n{out.getvalue()[-2000:].decode(errors='replace')}"
        vm.stop()
    return out.getvalue().decode(errors="replace")


def test_vmlinux_decompressed_on_the_host_prints_banner_and_cmdline(debian_vmlinux: Path) -> None:
    console = boot_until_cmdline_echo(debian_vmlinux, timeout=150)
    assert "Linux version 6." in console
    assert f"Kernel command line: {CMDLINE}" in console


def test_bzimage_boot_protocol_prints_banner_and_cmdline(debian_bzimage: Path) -> None:
    # The kernel's own decompressor runs first: ~46 s of emulated ring 0 here.
    console = boot_until_cmdline_echo(debian_bzimage, timeout=240)
    assert "Linux version 6." in console
    assert f"Kernel command line: {CMDLINE}" in console
