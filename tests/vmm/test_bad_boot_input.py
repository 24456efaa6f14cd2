"""Bad input to `build_microvm_for_boot`, every kind: a SnapvisorError that
names the thing and the fix, raised before any KVM VM exists, with nothing
written (every file in the test's folder keeps its bytes and times)."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Callable

import pytest

from flat_guest import elf_image, power_off
from snapvisor.errors import SnapvisorError
from snapvisor.vmm.builder import VmConfig, build_microvm_for_boot
from snapvisor.vmm.devices.blockfile import DiskConfig
from snapvisor.vmm.kvm import Kvm
from snapvisor.vmm.kvm import bindings as b

pytestmark = pytest.mark.kvm
MiB = 1 << 20


def _bzimage(payload: int, present: int) -> bytes:
    """A bzImage header whose compressed kernel is `payload` bytes, of which only `present` are in the file."""
    image = bytearray(5 * 512 + present)
    image[0x1F1] = 4
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x200:0x202] = b"\xeb\x66"
    struct.pack_into("<I", image, 0x202, 0x53726448)
    struct.pack_into("<H", image, 0x206, 0x020F)
    struct.pack_into("<H", image, 0x236, 1)
    struct.pack_into("<II", image, 0x248, 0, payload)
    struct.pack_into("<Q", image, 0x258, 0x1000000)
    struct.pack_into("<I", image, 0x260, 4 * MiB)
    return bytes(image)


def _max_vcpus() -> int:
    kvm = Kvm.open()
    try:
        return kvm.check_extension(b.KVM_CAP_NR_VCPUS) or 4
    finally:
        kvm.close()


def _disk(tmp_path: Path, mode: int = 0o644, size: int = MiB) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(size))
    path.chmod(mode)
    return path


Case = Callable[[Path, VmConfig], tuple[VmConfig, str, str]]  # -> config, the thing named, the fix's words
CASES: dict[str, Case] = {
    "kernel-empty": lambda t, c: (_with_kernel(c, t, b""), "kernel", "is empty; give the path of a Linux bzImage"),
    "kernel-random": lambda t, c: (_with_kernel(c, t, os.urandom(4096)), "kernel", "not an ELF64 kernel or a bzImage"),
    "kernel-arm64-elf": lambda t, c: (_with_kernel(c, t, _arm64_elf()), "kernel", "not an x86-64 executable"),
    "kernel-truncated-bzimage": lambda t, c: (_with_kernel(c, t, _bzimage(1 * MiB, 4096)), "kernel", "truncated bzImage.*copy the kernel file again"),
    "kernel-missing": lambda t, c: (_replace(c, kernel=t / "nope"), "kernel", "does not exist; give the path"),
    "kernel-directory": lambda t, c: (_replace(c, kernel=t), "kernel", "is a directory"),
    "vcpus-0": lambda t, c: (_replace(c, vcpus=0), "0 vCPUs", "ask for that many"),
    "vcpus-above-kvm": lambda t, c: (_replace(c, vcpus=_max_vcpus() + 1), f"{_max_vcpus() + 1} vCPUs", "ask for that many"),
    "mem-below-kernel": lambda t, c: (_with_kernel(_replace(c, mem_size=2 * MiB), t, elf_image(power_off(0) + bytes(2 * MiB))), "segment 0", "give the VM more memory"),
    "mem-below-bzimage": lambda t, c: (_with_kernel(_replace(c, mem_size=8 * MiB), t, _bzimage(4096, 4096)), "kernel", "needs at least 20 MiB.*give the VM more memory"),
    "disk-missing": lambda t, c: (_replace(c, disks=[DiskConfig(t / "none.img")]), "none.img", "does not exist; give the path"),
    "disk-directory": lambda t, c: (_replace(c, disks=[DiskConfig(t)]), "disk image", "is a directory"),
    "disk-read-only-file": lambda t, c: (_replace(c, disks=[DiskConfig(_disk(t, 0o444))]), "disk.img", r"read-only \(mode 0444\); attach it read-only"),
    "disk-unreadable": lambda t, c: (_replace(c, disks=[DiskConfig(_disk(t, 0o200))]), "disk.img", "not readable.*chmod u\\+r"),
    "disk-odd-size": lambda t, c: (_replace(c, disks=[DiskConfig(_disk(t, size=5000))]), "disk.img", "truncate -s"),
    "cmdline-too-long": lambda t, c: (_replace(c, cmdline="x" * 5000), "command line is 5000 bytes", "at most 4095: shorten it"),
    "initrd-missing": lambda t, c: (_replace(c, initrd=t / "initrd.cpio"), "initrd", "does not exist; give the path of an initramfs"),
    "initrd-too-big": lambda t, c: (_replace(c, initrd=_sparse(t / "big.cpio", 80 * MiB)), "big.cpio", "give the VM more memory \\(at least 82 MiB\\)"),
}


def _replace(config: VmConfig, **fields: object) -> VmConfig:
    return VmConfig(**{**config.__dict__, **fields})


def _with_kernel(config: VmConfig, tmp_path: Path, image: bytes) -> VmConfig:
    path = tmp_path / "kernel.bin"
    path.write_bytes(image)
    return _replace(config, kernel=path)


def _arm64_elf() -> bytes:
    image = bytearray(elf_image(power_off(0)))
    struct.pack_into("<H", image, 18, 183)  # EM_AARCH64
    return bytes(image)


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as file:
        file.truncate(size)
    return path


def _files(folder: Path) -> dict[Path, tuple[int, int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns, hash(p.read_bytes())) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_before_a_vm_exists(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "good.elf"
    good.write_bytes(elf_image(power_off(0)))
    config, thing, fix = CASES[case](tmp_path, VmConfig(kernel=good, mem_size=64 * MiB))
    vms_created = []
    real_create_vm = Kvm.create_vm
    monkeypatch.setattr(Kvm, "create_vm", lambda self: vms_created.append(1) or real_create_vm(self))
    before = _files(tmp_path)
    with pytest.raises(SnapvisorError) as caught:
        build_microvm_for_boot(config)
    message = str(caught.value)
    assert thing in message
    assert re.search(fix, message), message
    assert vms_created == []
    assert _files(tmp_path) == before


def test_the_good_config_the_cases_start_from_boots(tmp_path: Path) -> None:
    """The cases differ from a config that works by the one bad input each."""
    good = tmp_path / "good.elf"
    good.write_bytes(elf_image(power_off(0)))
    disk = _disk(tmp_path)
    with build_microvm_for_boot(VmConfig(kernel=good, mem_size=64 * MiB, disks=[DiskConfig(disk)], serial_out=open(os.devnull, "wb"))) as vm:
        vm.start()
        status = vm.wait(10)
    assert status is not None and status.code == 0
