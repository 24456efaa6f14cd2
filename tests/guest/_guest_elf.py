"""The built guest as pytest fixtures, and just enough ELF64 and objdump reading
to check it. Test modules import the fixtures by name (no conftest.py here: the
suite's modules import the top-level conftest by that name)."""

from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapvisor import testguest

PT_LOAD, PT_NOTE = 1, 4


@dataclass
class Segment:
    type: int
    offset: int
    paddr: int
    filesz: int
    memsz: int


@dataclass
class Section:
    name: str
    addr: int
    offset: int
    size: int


class GuestElf:
    def __init__(self, path: Path):
        self.path = path
        self.data = path.read_bytes()
        d = self.data
        assert d[:4] == b"\x7fELF", "not an ELF file"
        self.elf_class, self.machine = d[4], struct.unpack_from("<H", d, 18)[0]
        (self.entry, phoff, shoff) = struct.unpack_from("<QQQ", d, 24)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from("<HHHHH", d, 54)
        self.segments = []
        for i in range(phnum):
            p_type, _flags, off, _vaddr, paddr, filesz, memsz = struct.unpack_from(
                "<IIQQQQQ", d, phoff + i * phentsize
            )
            self.segments.append(Segment(p_type, off, paddr, filesz, memsz))
        raw = [struct.unpack_from("<IIQQQQ", d, shoff + i * shentsize) for i in range(shnum)]
        strtab_off = raw[shstrndx][4]
        self.sections = {}
        for name_off, _t, _f, addr, off, size in raw:
            end = d.index(b"\0", strtab_off + name_off)
            name = d[strtab_off + name_off : end].decode()
            self.sections[name] = Section(name, addr, off, size)

    def symbols(self) -> dict[str, int]:
        out = subprocess.run(["nm", str(self.path)], capture_output=True, text=True, check=True)
        syms = {}
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3:
                syms[parts[2]] = int(parts[0], 16)
        return syms

    def disassemble(self, section: str, arch: str = "i386:x86-64") -> list[tuple[int, str, str]]:
        """(address, mnemonic, operands) for each instruction of one section."""
        out = subprocess.run(
            ["objdump", "-d", "-w", "-M", "att", "-m", arch, "-j", section, str(self.path)],
            capture_output=True, text=True, check=True,
        )
        insns = []
        for line in out.stdout.splitlines():
            m = re.match(r"\s*([0-9a-f]+):\t[0-9a-f ]+\t(.*)$", line)
            if not m:
                continue
            words = m.group(2).split("#")[0].split()
            while words and words[0] in ("lock", "rep", "repz", "repnz", "data16", "rex.W", "notrack"):
                words = words[1:]
            if words:
                insns.append((int(m.group(1), 16), words[0], " ".join(words[1:])))
        return insns


# Instructions PLATFORM.md lists as failing in KVM's emulator (guest ring 0 on PVM):
# matched as mnemonic prefixes, so size suffixes (popcntq) are covered; "f" is x87.
_FORBIDDEN_PREFIXES = (
    "cmpxchg16b", "popcnt", "tzcnt", "lzcnt", "rdtscp", "xgetbv", "xsetbv", "xsave", "xrstor",
    "ldmxcsr", "stmxcsr", "movnti", "emms", "f",
)
_FORBIDDEN_EXACT = {"int3", "int", "(bad)"}
_VECTOR_OPERAND = re.compile(r"%(x|y|z)mm|%mm\d|%st")


def forbidden_in_ring0(mnemonic: str, operands: str) -> bool:
    return (
        mnemonic in _FORBIDDEN_EXACT
        or mnemonic.startswith(_FORBIDDEN_PREFIXES)
        or bool(_VECTOR_OPERAND.search(operands))
    )


@pytest.fixture(scope="session")
def guest_elf_path() -> Path:
    return testguest.build()


@pytest.fixture(scope="session")
def guest_elf(guest_elf_path) -> GuestElf:
    return GuestElf(guest_elf_path)
