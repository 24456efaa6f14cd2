"""ELF64 kernels (a Linux `vmlinux`, the project's test guest): PT_LOAD segments
are copied to their physical addresses, and PT_NOTE is searched for the
snapvisor boot note.

Boot note: name "snapvisor", type 1 = every vCPU enters at the ELF entry in
64-bit mode with the same initial state (instead of APs waiting for INIT/SIPI).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from snapvisor.vmm.errors import BootError
from snapvisor.vmm.loader.x86 import KERNEL_MIN_ADDR

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4

SNAPVISOR_NOTE_NAME = b"snapvisor"
NOTE_ALL_VCPUS_AT_ENTRY = 1

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")


@dataclass(frozen=True)
class ElfSegment:
    index: int
    offset: int  # in the file
    paddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class LoadedElf:
    entry: int
    segments: tuple[ElfSegment, ...]  # the PT_LOAD ones
    notes: frozenset[tuple[bytes, int]]  # (name, type) of every note

    @property
    def end(self) -> int:
        """The first byte after the highest loaded segment."""
        return max(segment.paddr + segment.memsz for segment in self.segments)

    @property
    def all_vcpus_at_entry(self) -> bool:
        return (SNAPVISOR_NOTE_NAME, NOTE_ALL_VCPUS_AT_ENTRY) in self.notes


def is_elf(image: bytes) -> bool:
    return image[:4] == ELF_MAGIC


def parse_elf(image: bytes, name: str, fits: Callable[[int, int], bool]) -> LoadedElf:
    """The file is an x86-64 executable whose segments lie in the file, load
    at or above 1 MiB into guest RAM (`fits(gpa, length)`) and hold the entry."""
    if len(image) < _EHDR.size:
        raise BootError(f"{name}: truncated ELF header")
    (ident, e_type, machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_rest) = (
        _EHDR.unpack_from(image)
    )
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise BootError(f"{name}: not a little-endian ELF64 file")
    if machine != EM_X86_64 or e_type != ET_EXEC:
        raise BootError(f"{name}: not an x86-64 executable (e_machine {machine}, e_type {e_type})")
    if phentsize != _PHDR.size or phoff + phnum * phentsize > len(image):
        raise BootError(f"{name}: program header table is out of the file")
    notes: set[tuple[bytes, int]] = set()
    segments: list[ElfSegment] = []
    for index in range(phnum):
        p_type, _pflags, offset, _vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(
            image, phoff + index * phentsize
        )
        if offset + filesz > len(image) or filesz > memsz:
            raise BootError(f"{name}: segment {index} lies outside the file")
        if p_type == PT_NOTE:
            notes |= _parse_notes(image[offset : offset + filesz], name)
        if p_type != PT_LOAD or memsz == 0:
            continue
        if paddr < KERNEL_MIN_ADDR:
            raise BootError(
                f"{name}: segment {index} loads at {paddr:#x}, below 1 MiB where the VMM keeps its boot structures"
            )
        if not fits(paddr, memsz):
            raise BootError(
                f"{name}: segment {index} ({paddr:#x}..{paddr + memsz:#x}) does not fit in guest RAM; give the VM more memory"
            )
        segments.append(ElfSegment(index, offset, paddr, filesz, memsz))
    if not segments:
        raise BootError(f"{name}: no loadable segments")
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in segments):
        raise BootError(f"{name}: entry point {entry:#x} is not inside a loaded segment")
    return LoadedElf(entry=entry, segments=tuple(segments), notes=frozenset(notes))


def _parse_notes(data: bytes, name: str) -> set[tuple[bytes, int]]:
    notes: set[tuple[bytes, int]] = set()
    position = 0
    while position + _NHDR.size <= len(data):
        namesz, descsz, note_type = _NHDR.unpack_from(data, position)
        position += _NHDR.size
        name_end = position + namesz
        position = name_end + (-namesz % 4)
        position += descsz + (-descsz % 4)
        if position > len(data):
            raise BootError(f"{name}: malformed ELF note")
        notes.add((data[name_end - namesz : name_end].rstrip(b"\0"), note_type))
    return notes
