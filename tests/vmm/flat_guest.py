"""Tiny ELF64 guests assembled from hand-encoded machine code, for tests of the
VMM's mechanics (loader, PIO, power-off) that need no real guest kernel."""

from __future__ import annotations

import struct
from pathlib import Path

LOAD_ADDRESS = 0x100000
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")


def out_byte(port: int, value: int) -> bytes:
    """mov dx, port; mov al, value; out dx, al"""
    return b"\x66\xba" + struct.pack("<H", port) + b"\xb0" + bytes([value]) + b"\xee"


def in_byte(port: int) -> bytes:
    """mov dx, port; in al, dx"""
    return b"\x66\xba" + struct.pack("<H", port) + b"\xec"


def out_al(port: int) -> bytes:
    """mov dx, port; out dx, al"""
    return b"\x66\xba" + struct.pack("<H", port) + b"\xee"


def spin() -> bytes:
    """jmp to itself: the guest keeps running, for tests that pause it."""
    return b"\xeb\xfe"


def print_text(text: bytes, port: int = 0x3F8) -> bytes:
    return b"".join(out_byte(port, c) for c in text)


def power_off(code: int) -> bytes:
    return out_byte(0x501, code) + b"\xf4\xeb\xfd"  # hlt; jmp back to hlt


def echo_one_byte_and_power_off() -> bytes:
    """Poll COM1's LSR until a byte arrives, echo it, and power off with it as status."""
    poll = b"\x66\xba\xfd\x03" + b"\xec" + b"\xa8\x01" + b"\x74\xf7"  # mov dx,LSR; in al,dx; test al,1; jz poll
    echo = b"\x66\xba\xf8\x03" + b"\xec" + b"\xee"  # mov dx,RBR; in al,dx; out dx,al
    exit_with_al = b"\x66\xba\x01\x05" + b"\xee" + b"\xf4\xeb\xfd"  # mov dx,0x501; out dx,al; hlt loop
    return poll + echo + exit_with_al


def snapvisor_note() -> bytes:
    name = b"snapvisor\0"
    return struct.pack("<III", len(name), 0, 1) + name + bytes(-len(name) % 4)


def elf_image(code: bytes, note: bytes = b"") -> bytes:
    """One PT_LOAD segment (headers + note + code) at 1 MiB, entry at the code."""
    phnum = 2 if note else 1
    headers = _EHDR.size + phnum * _PHDR.size
    note_offset = headers
    code_offset = headers + len(note)
    size = code_offset + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = _EHDR.pack(ident, 2, 62, 1, LOAD_ADDRESS + code_offset, _EHDR.size, 0, 0, _EHDR.size, _PHDR.size, phnum, 0, 0, 0)
    phdrs = _PHDR.pack(1, 7, 0, LOAD_ADDRESS, LOAD_ADDRESS, size, size, 0x1000)
    if note:
        phdrs += _PHDR.pack(4, 4, note_offset, LOAD_ADDRESS + note_offset, LOAD_ADDRESS + note_offset, len(note), len(note), 4)
    return ehdr + phdrs + note + code


def write_guest(path: Path, code: bytes, note: bytes = b"") -> Path:
    path.write_bytes(elf_image(code, note))
    return path
