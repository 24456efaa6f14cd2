"""Kernel loaders: ELF64 (vmlinux, the test guest) and Linux bzImage, both
entered in 64-bit mode with RSI pointing at the zero page.

`check_boot_files` finds everything `load_kernel` would refuse (a file that
is not a kernel, a kernel or initrd too big for the memory asked for, a
missing or unreadable file) before any VM exists."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from snapvisor.vmm.acpi import MmioDevice, write_acpi_tables
from snapvisor.vmm.errors import BootError
from snapvisor.vmm.loader import x86
from snapvisor.vmm.loader.bzimage import ENTRY_64_OFFSET, is_bzimage, plan_bzimage
from snapvisor.vmm.loader.elf import is_elf, parse_elf
from snapvisor.vmm.loader.mptable import write_mptable
from snapvisor.vmm.memory import MMIO_HOLE_START, PAGE_SIZE, GuestMemory, plan_layout


@dataclass(frozen=True)
class BootInfo:
    entry: int
    all_vcpus_at_entry: bool  # the snapvisor ELF note asked for it


@dataclass(frozen=True)
class _KernelPlan:
    entry: int
    end: int
    setup_header: bytes  # b"" for an ELF kernel
    cmdline_limit: int
    all_vcpus_at_entry: bool
    initrd_max: int  # the highest address the initrd may end at
    segments: tuple[tuple[int, int, int, int], ...]  # (gpa, file offset, file length, memory length)


def _file_error(exc: OSError, path: Path, what: str, fix: str) -> BootError:
    if isinstance(exc, FileNotFoundError):
        return BootError(f"{what} {path} does not exist; {fix}")
    if isinstance(exc, IsADirectoryError):
        return BootError(f"{what} {path} is a directory, not a file; {fix}")
    return BootError(f"cannot read {what} {path}: {exc.strerror}; {fix}")


def _read(path: Path, what: str, fix: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _file_error(exc, path, what, fix) from None
    if not data:
        raise BootError(f"{what} {path} is empty; {fix}")
    return data


def _readable_size(path: Path, what: str, fix: str) -> int:
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
    except OSError as exc:
        raise _file_error(exc, path, what, fix) from None
    if not size:
        raise BootError(f"{what} {path} is empty; {fix}")
    return size


_KERNEL_FIX = "give the path of a Linux bzImage or vmlinux, or the test guest's ELF"
_INITRD_FIX = "give the path of an initramfs (cpio) image"


def _plan_kernel(image: bytes, name: str, fits: Callable[[int, int], bool], ram_top: int) -> _KernelPlan:
    if is_elf(image):
        elf = parse_elf(image, name, fits)
        return _KernelPlan(
            elf.entry, elf.end, b"", x86.CMDLINE_MAX, elf.all_vcpus_at_entry, ram_top - 1,
            tuple((s.paddr, s.offset, s.filesz, s.memsz) for s in elf.segments),
        )
    if is_bzimage(image):
        bz = plan_bzimage(image, name, fits)
        header = bz.header
        cmdline_limit = min(header.cmdline_size + 1, x86.CMDLINE_MAX) if header.cmdline_size else x86.CMDLINE_MAX
        length = len(image) - header.setup_size
        return _KernelPlan(
            bz.entry, bz.end, header.setup_header, cmdline_limit, False, header.initrd_addr_max,
            ((bz.entry - ENTRY_64_OFFSET, header.setup_size, length, length),),
        )
    raise BootError(f"{name}: not an ELF64 kernel or a bzImage (unknown file format); {_KERNEL_FIX}")


def _initrd_address(size: int, path: Path, kernel_end: int, initrd_max: int, ram_top: int) -> int:
    """As high as allowed below 4 GiB, page aligned, above the kernel."""
    top = min(ram_top, initrd_max + 1)
    address = (top - size) & ~(PAGE_SIZE - 1)
    if address < kernel_end:
        need_mib = (kernel_end + size + PAGE_SIZE + (1 << 20) - 1) >> 20
        raise BootError(
            f"initrd {path} ({size >> 20} MiB) does not fit in guest RAM above the kernel; "
            f"give the VM more memory (at least {need_mib} MiB)"
        )
    return address


def check_boot_files(kernel: Path, initrd: Path | None, cmdline: str, mem_size: int) -> bytes:
    """Raise the BootError that loading would raise, without a VM; the kernel
    image as read (for `load_kernel`: a kernel is read once)."""
    layout = [(gpa, gpa + size) for _name, _slot, gpa, size in plan_layout(mem_size)]
    ram_top = min(mem_size, MMIO_HOLE_START)
    image = _read(kernel, "kernel", _KERNEL_FIX)
    plan = _plan_kernel(
        image, str(kernel), lambda gpa, n: any(s <= gpa and gpa + n <= e for s, e in layout), ram_top
    )
    try:
        x86.encode_cmdline(cmdline, plan.cmdline_limit)
    except ValueError as exc:
        raise BootError(str(exc)) from None
    if initrd is not None:
        size = _readable_size(initrd, "initrd", _INITRD_FIX)
        _initrd_address(size, initrd, plan.end, plan.initrd_max, ram_top)
    return image


def load_kernel(
    memory: GuestMemory,
    kernel: Path,
    initrd: Path | None,
    cmdline: str,
    vcpus: int = 1,
    mmio_devices: Sequence[MmioDevice] = (),
    image: bytes | None = None,
) -> BootInfo:
    """Load kernel, initrd and command line and write every boot structure:
    for `vcpus` CPUs and the virtio-mmio `mmio_devices`, the ACPI tables (what
    a distribution kernel reads) and the MP table (what a kernel built
    without ACPI reads). `image`: the kernel's bytes, when already read."""
    if image is None:
        image = _read(kernel, "kernel", _KERNEL_FIX)
    ram_top = x86.ram_top_below_4g(memory)
    plan = _plan_kernel(image, str(kernel), memory.contains, ram_top)
    for gpa, offset, length, memsz in plan.segments:
        target = memory.view(gpa, memsz)
        target[:length] = image[offset : offset + length]
        target[length:] = bytes(memsz - length)

    try:
        x86.write_cmdline(memory, cmdline, plan.cmdline_limit)
    except ValueError as exc:
        raise BootError(str(exc)) from None

    initrd_range = None
    if initrd is not None:
        data = _read(initrd, "initrd", _INITRD_FIX)
        address = _initrd_address(len(data), initrd, plan.end, plan.initrd_max, ram_top)
        memory.write(address, data)
        initrd_range = (address, len(data))
    x86.write_boot_structures(memory)
    write_mptable(memory, vcpus)
    rsdp = write_acpi_tables(memory, vcpus, mmio_devices)
    x86.build_zero_page(memory, plan.setup_header, initrd_range, rsdp)
    return BootInfo(entry=plan.entry, all_vcpus_at_entry=plan.all_vcpus_at_entry)
