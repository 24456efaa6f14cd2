"""Linux bzImage through the 64-bit boot protocol (Documentation/arch/x86/boot.rst):
the protected-mode part is loaded at `pref_address` and entered at +0x200 in
64-bit mode, with the kernel's own setup header copied into the zero page.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from snapvisor.vmm.errors import BootError
from snapvisor.vmm.loader.x86 import BOOT_FLAG, HEADER_MAGIC, KERNEL_MIN_ADDR

OFF_SETUP_SECTS = 0x1F1
OFF_BOOT_FLAG = 0x1FE
OFF_JUMP = 0x200  # 2-byte short jump; its displacement byte gives the header's end
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_INITRD_ADDR_MAX = 0x22C
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PAYLOAD_OFFSET = 0x248
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260

MIN_PROTOCOL = 0x020C  # 2.12: xloadflags, the first with a 64-bit entry point
XLF_KERNEL_64 = 1 << 0
ENTRY_64_OFFSET = 0x200
DEFAULT_SETUP_SECTS = 4
SECTOR = 512


@dataclass(frozen=True)
class BzImageHeader:
    setup_header: bytes  # bytes 0x1f1.. end of the setup header, for the zero page
    setup_size: int  # bytes before the protected-mode kernel
    version: int
    pref_address: int
    init_size: int
    cmdline_size: int
    initrd_addr_max: int
    payload_offset: int  # of the compressed vmlinux, relative to the protected-mode kernel
    payload_length: int


def is_bzimage(image: bytes) -> bool:
    return (
        len(image) > OFF_HEADER + 4
        and struct.unpack_from("<H", image, OFF_BOOT_FLAG)[0] == BOOT_FLAG
        and struct.unpack_from("<I", image, OFF_HEADER)[0] == HEADER_MAGIC
    )


def parse_header(image: bytes, name: str) -> BzImageHeader:
    if not is_bzimage(image) or len(image) < OFF_INIT_SIZE + 4:
        raise BootError(f"{name}: not a bzImage (no 'HdrS' setup header)")
    version = struct.unpack_from("<H", image, OFF_VERSION)[0]
    if version < MIN_PROTOCOL:
        raise BootError(f"{name}: boot protocol {version >> 8}.{version & 0xFF} is too old; 2.12 or later is needed")
    if not struct.unpack_from("<H", image, OFF_XLOADFLAGS)[0] & XLF_KERNEL_64:
        raise BootError(f"{name}: this kernel has no 64-bit entry point (XLF_KERNEL_64 clear)")
    setup_sects = image[OFF_SETUP_SECTS] or DEFAULT_SETUP_SECTS
    header_end = OFF_JUMP + 2 + image[OFF_JUMP + 1]
    setup_size = (setup_sects + 1) * SECTOR
    if setup_size >= len(image) or header_end > setup_size:
        raise BootError(f"{name}: truncated bzImage")
    payload_offset, payload_length = struct.unpack_from("<II", image, OFF_PAYLOAD_OFFSET)
    if setup_size + payload_offset + payload_length > len(image):
        raise BootError(
            f"{name}: truncated bzImage ({len(image)} bytes; its compressed kernel ends at byte "
            f"{setup_size + payload_offset + payload_length}): copy the kernel file again"
        )
    return BzImageHeader(
        setup_header=bytes(image[OFF_SETUP_SECTS:header_end]),
        setup_size=setup_size,
        version=version,
        pref_address=struct.unpack_from("<Q", image, OFF_PREF_ADDRESS)[0],
        init_size=struct.unpack_from("<I", image, OFF_INIT_SIZE)[0],
        cmdline_size=struct.unpack_from("<I", image, OFF_CMDLINE_SIZE)[0],
        initrd_addr_max=struct.unpack_from("<I", image, OFF_INITRD_ADDR_MAX)[0],
        payload_offset=payload_offset,
        payload_length=payload_length,
    )


@dataclass(frozen=True)
class LoadedBzImage:
    header: BzImageHeader
    entry: int
    end: int  # the kernel may use memory up to here while decompressing


def plan_bzimage(image: bytes, name: str, fits: Callable[[int, int], bool]) -> LoadedBzImage:
    """Where the kernel goes, checked against guest RAM (`fits(gpa, length)`)."""
    header = parse_header(image, name)
    load_address = max(header.pref_address, KERNEL_MIN_ADDR)
    footprint = max(header.init_size, len(image) - header.setup_size)
    if not fits(load_address, footprint):
        need_mib = (load_address + footprint + (1 << 20) - 1) >> 20
        raise BootError(f"{name}: this kernel needs at least {need_mib} MiB of guest RAM to decompress; give the VM more memory")
    return LoadedBzImage(header=header, entry=load_address + ENTRY_64_OFFSET, end=load_address + footprint)
