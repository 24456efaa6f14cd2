"""ELF64 and bzImage loaders: where things land in guest RAM, and bad input."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from flat_guest import LOAD_ADDRESS, elf_image, power_off, snapvisor_note
from snapvisor.vmm.errors import BootError
from snapvisor.vmm.kvm import Kvm
from snapvisor.vmm.loader import load_kernel, x86
from snapvisor.vmm.memory import GuestMemory

pytestmark = pytest.mark.kvm
MiB = 1 << 20


@pytest.fixture
def memory(kvm: Kvm):
    vm_fd = kvm.create_vm()
    mem = GuestMemory.create(vm_fd, 64 * MiB)
    yield mem
    mem.close()
    vm_fd.close()


def _u32(memory: GuestMemory, gpa: int) -> int:
    return struct.unpack("<I", memory.read(gpa, 4))[0]


def _e820(memory: GuestMemory) -> list[tuple[int, int, int]]:
    count = memory.read(x86.ZERO_PAGE_ADDR + x86.BP_E820_ENTRIES, 1)[0]
    table = memory.read(x86.ZERO_PAGE_ADDR + x86.BP_E820_TABLE, 20 * count)
    return [struct.unpack_from("<QQI", table, 20 * i) for i in range(count)]


def test_elf_kernel_lands_at_its_physical_address(memory: GuestMemory, tmp_path: Path) -> None:
    code = power_off(3)
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(code))
    boot = load_kernel(memory, kernel, None, "tg.exit=3 console=ttyS0")
    assert not boot.all_vcpus_at_entry
    assert memory.read(boot.entry, len(code)) == code
    assert memory.read(x86.CMDLINE_ADDR, 24) == b"tg.exit=3 console=ttyS0\0"
    assert _u32(memory, x86.ZERO_PAGE_ADDR + x86.BP_CMD_LINE_PTR) == x86.CMDLINE_ADDR
    assert _e820(memory) == [(0, 0x9FC00, 1), (0x9FC00, 0x100000 - 0x9FC00, 2), (MiB, 63 * MiB, 1)]
    # page tables: PML4[0] -> PDPT, PD entry 5 maps 10 MiB as a 2 MiB page
    assert struct.unpack("<Q", memory.read(x86.PML4_ADDR, 8))[0] == x86.PDPT_ADDR | 3
    assert struct.unpack("<Q", memory.read(x86.PD_ADDR + 5 * 8, 8))[0] == (5 << 21) | 0x83


def test_snapvisor_note_starts_every_vcpu_at_entry(memory: GuestMemory, tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(power_off(0), note=snapvisor_note()))
    assert load_kernel(memory, kernel, None, "").all_vcpus_at_entry


def test_initrd_is_page_aligned_at_the_top_of_ram(memory: GuestMemory, tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(power_off(0)))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x5a" * 10000)
    load_kernel(memory, kernel, initrd, "")
    address = _u32(memory, x86.ZERO_PAGE_ADDR + x86.BP_RAMDISK_IMAGE)
    assert _u32(memory, x86.ZERO_PAGE_ADDR + x86.BP_RAMDISK_SIZE) == 10000
    assert address % 4096 == 0 and address + 10000 <= 64 * MiB < address + 10000 + 4096
    assert memory.read(address, 10000) == b"\x5a" * 10000


def _bzimage(setup_sects: int = 4, version: int = 0x020F, xloadflags: int = 1, init_size: int = 4 * MiB) -> bytes:
    image = bytearray((setup_sects + 1) * 512 + 8192)
    image[0x1F1] = setup_sects
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x200:0x202] = b"\xeb\x66"  # jump over the header: it ends at 0x268
    struct.pack_into("<I", image, 0x202, 0x53726448)
    struct.pack_into("<H", image, 0x206, version)
    struct.pack_into("<I", image, 0x22C, 0x37FFFFFF)  # initrd_addr_max
    struct.pack_into("<H", image, 0x236, xloadflags)
    struct.pack_into("<I", image, 0x238, 2047)  # cmdline_size
    struct.pack_into("<Q", image, 0x258, 0x1000000)  # pref_address
    struct.pack_into("<I", image, 0x260, init_size)
    image[(setup_sects + 1) * 512 :] = b"\x90" * 8192
    return bytes(image)


def test_bzimage_64bit_boot_protocol(memory: GuestMemory, tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    image = _bzimage()
    kernel.write_bytes(image)
    boot = load_kernel(memory, kernel, None, "console=ttyS0 earlyprintk=serial")
    assert boot.entry == 0x1000000 + 0x200
    assert memory.read(0x1000000, 8192) == b"\x90" * 8192
    zero_page = memory.read(x86.ZERO_PAGE_ADDR, 4096)
    assert zero_page[0x1F1] == 4  # the kernel's own setup header was copied
    assert struct.unpack_from("<I", zero_page, 0x258 - 0x0)[0] == 0x1000000
    assert zero_page[x86.BP_TYPE_OF_LOADER] == 0xFF
    assert struct.unpack_from("<I", zero_page, x86.BP_CMD_LINE_PTR)[0] == x86.CMDLINE_ADDR


def test_bzimage_command_line_limit_is_the_kernels(memory: GuestMemory, tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(_bzimage())
    with pytest.raises(BootError, match="at most 2047"):
        load_kernel(memory, kernel, None, "x" * 3000)


@pytest.mark.parametrize(
    "image,message",
    [
        (_bzimage(version=0x0206), "boot protocol 2.6 is too old"),
        (_bzimage(xloadflags=0), "no 64-bit entry point"),
        (_bzimage(init_size=200 * MiB), "needs at least 216 MiB"),
    ],
    ids=["old-protocol", "no-64bit-entry", "too-big"],
)
def test_bad_bzimages(memory: GuestMemory, tmp_path: Path, image: bytes, message: str) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(image)
    with pytest.raises(BootError, match=message):
        load_kernel(memory, kernel, None, "")


def _patched_elf(**fields: int) -> bytes:
    image = bytearray(elf_image(power_off(0)))
    if "paddr" in fields:
        struct.pack_into("<Q", image, 64 + 24, fields["paddr"])
    if "memsz" in fields:
        struct.pack_into("<Q", image, 64 + 40, fields["memsz"])
    if "machine" in fields:
        struct.pack_into("<H", image, 18, fields["machine"])
    if "entry" in fields:
        struct.pack_into("<Q", image, 24, fields["entry"])
    return bytes(image)


@pytest.mark.parametrize(
    "image,message",
    [
        (b"\x7fELF\x02\x01\x01", "truncated ELF header"),
        (_patched_elf(machine=3), "not an x86-64 executable"),
        (_patched_elf(paddr=0x8000), "below 1 MiB"),
        (_patched_elf(memsz=100 * MiB), "does not fit in guest RAM"),
        (_patched_elf(paddr=0xFEE00000), "does not fit in guest RAM"),
        (_patched_elf(entry=LOAD_ADDRESS + 0x100000), "entry point .* is not inside a loaded segment"),
        (b"MZ" + bytes(1000), "not an ELF64 kernel or a bzImage"),
    ],
    ids=["truncated", "not-x86-64", "below-1mib", "bigger-than-ram", "in-mmio-hole", "entry-outside", "unknown-format"],
)
def test_bad_elf_kernels(memory: GuestMemory, tmp_path: Path, image: bytes, message: str) -> None:
    kernel = tmp_path / "bad"
    kernel.write_bytes(image)
    with pytest.raises(BootError, match=message):
        load_kernel(memory, kernel, None, "")


def test_missing_kernel(memory: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(BootError, match="does not exist"):
        load_kernel(memory, tmp_path / "nope", None, "")


def test_mp_table_lists_every_vcpu_and_the_ioapic(memory: GuestMemory, tmp_path: Path) -> None:
    """The MP table (for kernels built with CONFIG_X86_MPPARSE, as Firecracker's
    are) sits where Linux scans for it, with valid checksums."""
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(power_off(0)))
    load_kernel(memory, kernel, None, "", vcpus=2)
    pointer = memory.read(0x9FC00, 16)
    assert pointer[:4] == b"_MP_" and sum(pointer) % 256 == 0
    table_address = struct.unpack_from("<I", pointer, 4)[0]
    length = struct.unpack_from("<H", memory.read(table_address + 4, 2))[0]
    table = memory.read(table_address, length)
    assert table[:4] == b"PCMP" and sum(table) % 256 == 0 and table_address + length <= 0xA0000
    entry_count = struct.unpack_from("<H", table, 34)[0]
    position, processors, ioapics, interrupts = 44, [], [], 0
    for _ in range(entry_count):
        kind = table[position]
        if kind == 0:
            processors.append((table[position + 1], table[position + 3]))  # (APIC id, flags)
            position += 20
        else:
            if kind == 2:
                ioapics.append((table[position + 1], struct.unpack_from("<I", table, position + 4)[0]))
            interrupts += kind in (3, 4)
            position += 8
    assert position == length
    assert processors == [(0, 0b11), (1, 0b01)]  # enabled; CPU 0 is the BSP
    assert ioapics == [(2, 0xFEC00000)]
    assert interrupts == 16 + 2
