"""Kernel loaders: ELF64 (vmlinux, the test guest) and Linux bzImage, both
entered in 64-bit mode with RSI pointing at the zero page."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from snapvisor.vmm.acpi import MmioDevice, write_acpi_tables
from snapvisor.vmm.errors import BootError
from snapvisor.vmm.loader import x86
from snapvisor.vmm.loader.bzimage import is_bzimage, load_bzimage
from snapvisor.vmm.loader.elf import is_elf, load_elf
from snapvisor.vmm.loader.mptable import write_mptable
from snapvisor.vmm.memory import PAGE_SIZE, GuestMemory


@dataclass(frozen=True)
class BootInfo:
    entry: int
    all_vcpus_at_entry: bool  # the snapvisor ELF note asked for it


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BootError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise BootError(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise BootError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_kernel(
    memory: GuestMemory,
    kernel: Path,
    initrd: Path | None,
    cmdline: str,
    vcpus: int = 1,
    mmio_devices: Sequence[MmioDevice] = (),
) -> BootInfo:
    """Load kernel, initrd and command line and write every boot structure:
    for `vcpus` CPUs and the virtio-mmio `mmio_devices`, the ACPI tables (what
    a distribution kernel reads) and the MP table (what a kernel built
    without ACPI reads)."""
    image = _read(kernel, "kernel")
    name = str(kernel)
    if is_elf(image):
        elf = load_elf(memory, image, name)
        entry, kernel_end, setup_header, cmdline_limit = elf.entry, elf.end, b"", x86.CMDLINE_MAX
        all_at_entry = elf.all_vcpus_at_entry
        initrd_max = x86.ram_top_below_4g(memory) - 1
    elif is_bzimage(image):
        bz = load_bzimage(memory, image, name)
        entry, kernel_end, setup_header = bz.entry, bz.end, bz.header.setup_header
        cmdline_limit = min(bz.header.cmdline_size + 1, x86.CMDLINE_MAX) if bz.header.cmdline_size else x86.CMDLINE_MAX
        all_at_entry = False
        initrd_max = bz.header.initrd_addr_max
    else:
        raise BootError(f"{name}: not an ELF64 kernel or a bzImage (unknown file format)")

    try:
        x86.write_cmdline(memory, cmdline, cmdline_limit)
    except ValueError as exc:
        raise BootError(str(exc)) from None

    initrd_range = None
    if initrd is not None:
        initrd_range = _load_initrd(memory, _read(initrd, "initrd"), initrd, kernel_end, initrd_max)
    x86.write_boot_structures(memory)
    write_mptable(memory, vcpus)
    rsdp = write_acpi_tables(memory, vcpus, mmio_devices)
    x86.build_zero_page(memory, setup_header, initrd_range, rsdp)
    return BootInfo(entry=entry, all_vcpus_at_entry=all_at_entry)


def _load_initrd(memory: GuestMemory, data: bytes, path: Path, kernel_end: int, initrd_max: int) -> tuple[int, int]:
    """Place the initrd as high as allowed below 4 GiB, page aligned, above the kernel."""
    top = min(x86.ram_top_below_4g(memory), initrd_max + 1)
    address = (top - len(data)) & ~(PAGE_SIZE - 1)
    if address < kernel_end:
        raise BootError(
            f"initrd {path} ({len(data) >> 20} MiB) does not fit in guest RAM above the kernel; give the VM more memory"
        )
    memory.write(address, data)
    return address, len(data)
