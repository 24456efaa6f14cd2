"""x86 boot structures the VMM writes into guest RAM before the first KVM_RUN:
GDT, TSS, an empty IDT, identity page tables, the zero page (Linux
`boot_params`) with its e820 map, and the command line; plus the register
state of a CPU entering in 64-bit mode (Linux 64-bit boot protocol).

Low-memory layout (docs/architecture.md):
  0x0500  GDT          0x1000  TSS          0x2000  IDT (256 empty gates)
  0x7000  zero page    0x9000  PML4, 0xa000 PDPT, 0xb000-0xefff four PDs
  0x20000 command line (up to 4 KiB)
Everything the VMM writes lies below 1 MiB; kernels load at 1 MiB or above.
"""

from __future__ import annotations

import struct
from array import array

from snapvisor.vmm.kvm.bindings import CData
from snapvisor.vmm.memory import MMIO_HOLE_START, GuestMemory

GDT_ADDR = 0x500
TSS_ADDR = 0x1000
TSS_SIZE = 0x68
IDT_ADDR = 0x2000
IDT_SIZE = 256 * 16
ZERO_PAGE_ADDR = 0x7000
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
IDENTITY_MAPPED_GIB = 4
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 4096
KERNEL_MIN_ADDR = 0x100000  # the VMM's structures live below 1 MiB
EBDA_START = 0x9FC00  # legacy area [640 KiB, 1 MiB) is reserved in e820

# selectors: Linux __BOOT_CS / __BOOT_DS, then a 16-byte TSS descriptor
CODE64_SELECTOR = 0x10
DATA_SELECTOR = 0x18
TSS_SELECTOR = 0x20

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

LONG_MODE_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
LONG_MODE_CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
LONG_MODE_EFER = EFER_SCE | EFER_LME | EFER_LMA

# page-table entry bits
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_HUGE = 1 << 7

# boot_params (zero page) offsets, Documentation/arch/x86/zero-page.rst
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SETUP_HEADER = 0x1F1
BP_BOOT_FLAG = 0x1FE
BP_HEADER_MAGIC = 0x202
BP_TYPE_OF_LOADER = 0x210
BP_RAMDISK_IMAGE = 0x218
BP_RAMDISK_SIZE = 0x21C
BP_CMD_LINE_PTR = 0x228
BP_KERNEL_ALIGNMENT = 0x230
BP_CMDLINE_SIZE = 0x238
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128
ZERO_PAGE_SIZE = 4096

BOOT_FLAG = 0xAA55
HEADER_MAGIC = 0x53726448  # "HdrS"
LOADER_TYPE_UNDEFINED = 0xFF
E820_RAM = 1
E820_RESERVED = 2

_GDT_ENTRY = struct.Struct("<Q")
_E820_ENTRY = struct.Struct("<QQI")


def _segment_descriptor(flags: int, base: int, limit: int) -> int:
    """An 8-byte code/data descriptor; `flags` packs access byte and G/D/L bits
    as they sit in bits 40-55 of the descriptor."""
    return (
        ((base & 0xFF000000) << 32)
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0xF0000) << 32)
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0xFFFF)
    )


CODE64_FLAGS = 0xA09B  # G, L, present, DPL0, code exec/read, accessed
DATA_FLAGS = 0xC093  # G, D/B, present, DPL0, data read/write, accessed
TSS64_BUSY_FLAGS = 0x008B  # present, DPL0, 64-bit TSS (busy)
GDT_LIMIT = 6 * 8 - 1  # null, unused, code, data, 16-byte TSS


def write_gdt(memory: GuestMemory) -> None:
    tss_low = _segment_descriptor(TSS64_BUSY_FLAGS, TSS_ADDR, TSS_SIZE - 1)
    tss_high = TSS_ADDR >> 32
    entries = [
        0,
        0,
        _segment_descriptor(CODE64_FLAGS, 0, 0xFFFFF),
        _segment_descriptor(DATA_FLAGS, 0, 0xFFFFF),
        tss_low,
        tss_high,
    ]
    memory.write(GDT_ADDR, b"".join(_GDT_ENTRY.pack(entry) for entry in entries))
    # TSS: all zero except the I/O map base pointing past the limit (no I/O bitmap).
    tss = bytearray(TSS_SIZE)
    struct.pack_into("<H", tss, 0x66, TSS_SIZE)
    memory.write(TSS_ADDR, tss)
    memory.write(IDT_ADDR, bytes(IDT_SIZE))



def write_identity_page_tables(memory: GuestMemory) -> None:
    """Identity-map the first 4 GiB with 2 MiB pages (PML4 -> 1 PDPT -> 4 PDs)."""
    table_flags = PTE_PRESENT | PTE_WRITABLE
    memory.write(PML4_ADDR, struct.pack("<Q", PDPT_ADDR | table_flags) + bytes(4096 - 8))
    pdpt = array("Q", [(PD_ADDR + 0x1000 * i) | table_flags for i in range(IDENTITY_MAPPED_GIB)])
    memory.write(PDPT_ADDR, pdpt.tobytes() + bytes(4096 - 8 * IDENTITY_MAPPED_GIB))
    pds = array("Q", [(i << 21) | table_flags | PTE_HUGE for i in range(512 * IDENTITY_MAPPED_GIB)])
    memory.write(PD_ADDR, pds.tobytes())  # x86-64 hosts only: array("Q") is little-endian here


def e820_map(memory: GuestMemory) -> list[tuple[int, int, int]]:
    """(address, size, type) entries: RAM below 640 KiB, the legacy hole, RAM
    from 1 MiB, RAM above 4 GiB."""
    entries: list[tuple[int, int, int]] = []
    for region in memory.regions:
        if region.gpa == 0:
            entries.append((0, min(region.size, EBDA_START), E820_RAM))
            entries.append((EBDA_START, KERNEL_MIN_ADDR - EBDA_START, E820_RESERVED))
            if region.size > KERNEL_MIN_ADDR:
                entries.append((KERNEL_MIN_ADDR, region.size - KERNEL_MIN_ADDR, E820_RAM))
        else:
            entries.append((region.gpa, region.size, E820_RAM))
    return entries


def encode_cmdline(cmdline: str, limit: int = CMDLINE_MAX) -> bytes:
    """The NUL-terminated command line; ValueError if the kernel cannot take it."""
    encoded = cmdline.encode()
    if b"\0" in encoded:
        raise ValueError("the kernel command line may not contain NUL bytes")
    if len(encoded) + 1 > limit:
        raise ValueError(
            f"the kernel command line is {len(encoded)} bytes; this kernel takes at most {limit - 1}: shorten it"
        )
    return encoded + b"\0"


def write_cmdline(memory: GuestMemory, cmdline: str, limit: int = CMDLINE_MAX) -> int:
    encoded = encode_cmdline(cmdline, limit)
    memory.write(CMDLINE_ADDR, encoded)
    return len(encoded) - 1


def build_zero_page(
    memory: GuestMemory,
    setup_header: bytes,
    initrd: tuple[int, int] | None,
    acpi_rsdp: int = 0,
) -> None:
    """Write boot_params at ZERO_PAGE_ADDR. `setup_header` is the kernel's own
    header (bytes from 0x1f1 of a bzImage) or b"" for an ELF kernel, in which
    case a minimal valid header is synthesised. `acpi_rsdp` (0: none) saves
    Linux (5.0 and later) the scan for the RSDP."""
    page = bytearray(ZERO_PAGE_SIZE)
    page[BP_SETUP_HEADER : BP_SETUP_HEADER + len(setup_header)] = setup_header
    struct.pack_into("<H", page, BP_BOOT_FLAG, BOOT_FLAG)
    struct.pack_into("<I", page, BP_HEADER_MAGIC, HEADER_MAGIC)
    page[BP_TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    struct.pack_into("<I", page, BP_CMD_LINE_PTR, CMDLINE_ADDR)
    struct.pack_into("<I", page, BP_EXT_CMD_LINE_PTR, CMDLINE_ADDR >> 32)
    struct.pack_into("<Q", page, BP_ACPI_RSDP_ADDR, acpi_rsdp)
    if not setup_header:
        struct.pack_into("<I", page, BP_KERNEL_ALIGNMENT, 0x1000000)
        struct.pack_into("<I", page, BP_CMDLINE_SIZE, CMDLINE_MAX - 1)
    if initrd is not None:
        address, size = initrd
        struct.pack_into("<I", page, BP_RAMDISK_IMAGE, address & 0xFFFFFFFF)
        struct.pack_into("<I", page, BP_RAMDISK_SIZE, size & 0xFFFFFFFF)
        struct.pack_into("<I", page, BP_EXT_RAMDISK_IMAGE, address >> 32)
        struct.pack_into("<I", page, BP_EXT_RAMDISK_SIZE, size >> 32)
    entries = e820_map(memory)
    page[BP_E820_ENTRIES] = len(entries)
    for index, entry in enumerate(entries):
        _E820_ENTRY.pack_into(page, BP_E820_TABLE + index * _E820_ENTRY.size, *entry)
    memory.write(ZERO_PAGE_ADDR, page)


def write_boot_structures(memory: GuestMemory) -> None:
    write_gdt(memory)
    write_identity_page_tables(memory)


def set_long_mode_sregs(sregs: CData) -> None:
    """Fill a `struct kvm_sregs` for 64-bit mode with the GDT, TSS and page tables above."""
    code = sregs.cs
    code.base, code.limit, code.selector = 0, 0xFFFFFFFF, CODE64_SELECTOR
    code.type, code.present, code.dpl, code.db, code.s, code.l, code.g = 0xB, 1, 0, 0, 1, 1, 1
    for segment in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        segment.base, segment.limit, segment.selector = 0, 0xFFFFFFFF, DATA_SELECTOR
        segment.type, segment.present, segment.dpl, segment.db, segment.s, segment.l, segment.g = 3, 1, 0, 1, 1, 0, 1
        segment.unusable = 0
    tr = sregs.tr
    tr.base, tr.limit, tr.selector = TSS_ADDR, TSS_SIZE - 1, TSS_SELECTOR
    tr.type, tr.present, tr.dpl, tr.db, tr.s, tr.l, tr.g, tr.unusable = 0xB, 1, 0, 0, 0, 0, 0, 0
    sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, GDT_LIMIT
    sregs.idt.base, sregs.idt.limit = IDT_ADDR, IDT_SIZE - 1
    sregs.cr0 = LONG_MODE_CR0
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = LONG_MODE_CR4
    sregs.efer = LONG_MODE_EFER


RFLAGS_RESERVED = 0x2  # bit 1 is always set; interrupts start disabled


def set_entry_regs(regs: CData, entry: int) -> None:
    """RIP at the kernel entry, RSI at the zero page, everything else zero."""
    regs.rip = entry
    regs.rsi = ZERO_PAGE_ADDR
    regs.rflags = RFLAGS_RESERVED


def ram_top_below_4g(memory: GuestMemory) -> int:
    low = memory.regions[0]
    return min(low.end, MMIO_HOLE_START)

