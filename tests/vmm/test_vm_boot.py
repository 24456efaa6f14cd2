"""Booting real guests on /dev/kvm: the project's test guest on 1 and 2 vCPUs,
and small hand-assembled guests for reset, triple fault and vCPU start-up."""

from __future__ import annotations

import io
import os
import re
import struct
from pathlib import Path

import pytest

from flat_guest import echo_one_byte_and_power_off, elf_image, out_byte, power_off, print_text, snapvisor_note
from snapvisor.vmm.builder import VmConfig, build_microvm_for_boot
from snapvisor.vmm.errors import BootError
from snapvisor.vmm.exit_status import ExitStatus

pytestmark = pytest.mark.kvm
MiB = 1 << 20
ROUND = re.compile(r"^tg: cpu=(\d+) round=(\d+) dirtied=(\d+) verified=(\d+) ticks=(\d+)$")


def run_guest(kernel: Path, cmdline: str = "console=ttyS0", vcpus: int = 1, timeout: float = 60) -> tuple[ExitStatus, str]:
    out = io.BytesIO()
    config = VmConfig(kernel=kernel, cmdline=cmdline, mem_size=64 * MiB, vcpus=vcpus, serial_out=out)
    with build_microvm_for_boot(config) as vm:
        vm.start()
        status = vm.wait(timeout)
        assert status is not None, f"the guest did not stop within {timeout} s: {out.getvalue()!r}"
    return status, out.getvalue().decode()


@pytest.mark.parametrize("vcpus", [1, 2])
def test_testguest_boots_and_runs_its_workload(testguest: Path, vcpus: int) -> None:
    status, console = run_guest(
        testguest, f"console=ttyS0 tg.mem=8 tg.rounds=3 tg.exit=42 tg.cpus={vcpus} tg.seed=7", vcpus
    )
    assert (status.code, status.reason) == (42, "poweroff")
    lines = console.splitlines()
    assert lines[0] == f"tg: snapvisor-testguest 1 cpus={vcpus} mem=8 seed=7"
    assert "tg: timer ok" in lines  # PIT interrupts arrive through the in-kernel irqchip
    assert lines[-1] == "tg: done"
    assert not [line for line in lines if "FAIL" in line or "FAULT" in line or "ERROR" in line]
    rounds = [tuple(map(int, m.groups())) for m in map(ROUND.match, lines) if m]
    pages_per_cpu = 8 * 256 // vcpus
    for cpu in range(vcpus):
        mine = [r for r in rounds if r[0] == cpu]
        assert [r[1] for r in mine] == [0, 1, 2, 3]
        assert all(dirtied == verified == pages_per_cpu for _, _, dirtied, verified, _ in mine)
        ticks = [r[4] for r in mine]
        assert ticks == sorted(ticks) and ticks[-1] > 0


def test_poweroff_status_is_the_byte_written(tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(print_text(b"bye\n") + power_off(200)))
    status, console = run_guest(kernel, timeout=10)
    assert status == ExitStatus(200, "poweroff", "the guest powered off with status 200")
    assert console == "bye\n"


def test_i8042_reset(tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(out_byte(0x64, 0xFE) + b"\xf4\xeb\xfd"))
    status, _ = run_guest(kernel, timeout=10)
    assert (status.code, status.reason) == (0, "reset")
    assert "i8042" in status.message


def test_triple_fault_is_a_reset(tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(b"\x0f\x0b"))  # ud2 with the VMM's empty IDT
    status, _ = run_guest(kernel, timeout=10)
    assert (status.code, status.reason) == (0, "reset")
    assert "triple" in status.message


def _two_cpu_handshake() -> bytes:
    """The CPU whose LAPIC id is 0 waits until another CPU sets a flag, then
    prints '2' and powers off; any other CPU sets the flag and halts."""
    flag = struct.pack("<I", 0x200000)
    ap = b"\xc6\x04\x25" + flag + b"\x01" + b"\xf4\xeb\xfd"  # mov byte [flag], 1; hlt loop
    wait = b"\x80\x3c\x25" + flag + b"\x01" + b"\x75\xf6"  # cmp byte [flag], 1; jne wait
    bsp = wait + print_text(b"2") + power_off(0)
    prefix = (
        b"\x48\xbb" + struct.pack("<Q", 0xFEE00020)  # mov rbx, LAPIC ID register
        + b"\x8b\x03"  # mov eax, [rbx]
        + b"\xc1\xe8\x18"  # shr eax, 24
        + b"\x85\xc0"  # test eax, eax
        + b"\x75" + bytes([len(bsp)])  # jnz ap
    )
    return prefix + bsp + ap


def test_snapvisor_note_starts_every_vcpu_at_the_entry(tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(_two_cpu_handshake(), note=snapvisor_note()))
    status, console = run_guest(kernel, vcpus=2, timeout=10)
    assert (status.code, console) == (0, "2")


def test_without_the_note_application_processors_wait_for_sipi(tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(_two_cpu_handshake()))
    out = io.BytesIO()
    config = VmConfig(kernel=kernel, mem_size=64 * MiB, vcpus=2, serial_out=out)
    with build_microvm_for_boot(config) as vm:
        vm.start()
        assert vm.wait(0.5) is None  # CPU 0 waits for a CPU that never started
        assert vm.stop().reason == "stopped"
    assert out.getvalue() == b""


def test_host_input_reaches_the_guest_through_the_uart(tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(echo_one_byte_and_power_off()))
    read_end, write_end = os.pipe()
    out = io.BytesIO()
    try:
        config = VmConfig(kernel=kernel, mem_size=16 * MiB, serial_out=out, serial_in=read_end)
        with build_microvm_for_boot(config) as vm:
            vm.start()
            os.write(write_end, b"Q")
            status = vm.wait(10)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert (status.code, status.reason) == (ord("Q"), "poweroff")
    assert out.getvalue() == b"Q"


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if "snapvisor-ram" in line)


def test_close_releases_every_fd_and_guest_mapping(tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(power_off(0)))
    fds_before, maps_before = _open_fds(), _mappings()
    for vcpus in (1, 2, 1):
        vm = build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=16 * MiB, vcpus=vcpus, serial_out=io.BytesIO()))
        vm.start()
        assert vm.wait(10).code == 0
        vm.close()
        vm.close()  # idempotent
    assert _open_fds() == fds_before
    assert _mappings() == maps_before


def test_a_failed_build_leaks_nothing(tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(power_off(0))[:50])
    fds_before = _open_fds()
    with pytest.raises(BootError, match="truncated"):
        build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=16 * MiB, serial_out=io.BytesIO()))
    assert _open_fds() == fds_before


def test_string_port_io_in_both_directions(tmp_path: Path) -> None:
    """`rep outsb` to COM1 and `rep insb` from its scratch register: exits that
    carry several items, read from or written to the kvm_run data area."""
    text = b"string I/O works\n"
    buffer_gpa = 0x300000
    body = (
        out_byte(0x3FF, 0x5A)  # scratch register = 0x5a
        + b"\xbf" + struct.pack("<I", buffer_gpa)  # mov edi, buffer
        + b"\xb9" + struct.pack("<I", 64)  # mov ecx, 64
        + b"\xf3\x6c"  # rep insb (dx = 0x3ff)
        + b"\x66\xba\xf8\x03"  # mov dx, COM1
        + b"\xbe" + b"TEXT"  # mov esi, text (patched below)
        + b"\xb9" + struct.pack("<I", len(text))  # mov ecx, len
        + b"\xf3\x6e"  # rep outsb
        + power_off(0)
    )
    code_gpa = 0x100000 + 64 + 56  # elf_image puts the code right after its headers
    code = body.replace(b"TEXT", struct.pack("<I", code_gpa + len(body))) + text
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(code))
    out = io.BytesIO()
    with build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=16 * MiB, serial_out=out)) as vm:
        vm.start()
        assert vm.wait(10).code == 0
        assert vm.memory.read(buffer_gpa, 65) == b"\x5a" * 64 + b"\x00"
    assert out.getvalue() == text


class RecordingMmioDevice:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return 0x11223344 + offset

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def test_mmio_dispatch_by_address_range(tmp_path: Path) -> None:
    base = 0xD0000000
    code = (
        b"\xbb" + struct.pack("<I", base)  # mov ebx, base
        + b"\xc7\x43\x08" + struct.pack("<I", 0xCAFEF00D)  # mov dword [rbx+8], 0xcafef00d
        + b"\x8b\x43\x04"  # mov eax, [rbx+4]      -> 0x11223348
        + b"\x8b\x8b" + struct.pack("<I", 0x1000)  # mov ecx, [rbx+0x1000] (unclaimed: all ones)
        + b"\x01\xc8"  # add eax, ecx          -> 0x11223347
        + b"\x66\xba\x01\x05\xee\xf4\xeb\xfd"  # out 0x501, al -> status 0x47
    )
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(code))
    device = RecordingMmioDevice()
    with build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=16 * MiB, serial_out=io.BytesIO())) as vm:
        vm.mmio_bus.register(base, 0x1000, device)
        vm.start()
        status = vm.wait(10)
    assert device.writes == [(8, 4, 0xCAFEF00D)]
    assert status.code == 0x47


def test_requests_made_before_a_vcpu_thread_runs_are_honoured(tmp_path: Path) -> None:
    """CPU 0 powers off (or the VMM pauses) before CPU 1's thread is even alive:
    CPU 1 must still stop (or park) instead of waiting for a SIPI forever."""
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(power_off(5)))
    for _ in range(25):
        with build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=16 * MiB, vcpus=2, serial_out=io.BytesIO())) as vm:
            vm.start()
            status = vm.wait(5)
            assert status is not None and status.code == 5
    for _ in range(10):
        with build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=16 * MiB, vcpus=2, serial_out=io.BytesIO())) as vm:
            vm.start()
            vm.pause(timeout=2)
            vm.resume()
            assert vm.wait(5) is not None
