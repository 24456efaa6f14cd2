"""A small AML (ACPI Machine Language) encoder: the few terms a DSDT for a
micro-VM needs (ACPI 6.5, chapter 20), encoded as `iasl` encodes them, so the
tests can compare our bytes with iasl's for the same ASL.

Every function returns the encoded term as bytes; terms nest by passing the
inner terms' bytes to the outer one.
"""

from __future__ import annotations

import struct

ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C  # "\"
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F

# Resource descriptors (ACPI 6.5, 6.4)
IRQ_NO_FLAGS = 0x22  # small item 0x4, 2 bytes
IO_PORT = 0x47  # small item 0x8, 7 bytes
IO_DECODE_16 = 1
MEMORY32_FIXED = 0x86
EXTENDED_INTERRUPT = 0x89
END_TAG = 0x79

_PKG_LENGTH_MAX = 1 << 28
_ONES = (1 << 64) - 1  # a revision 2 definition block has 64-bit integers


class AmlError(ValueError):
    """A name or value that AML cannot encode."""


def pkg_length(body_length: int) -> bytes:
    """PkgLength for a body of `body_length` bytes: the encoded length counts
    its own bytes too, so the size of the encoding is chosen first."""
    for extra_bytes in range(4):
        total = body_length + 1 + extra_bytes
        if extra_bytes == 0 and total < 0x40:
            return bytes([total])
        if extra_bytes and total < (1 << (4 + 8 * extra_bytes)):
            lead = (extra_bytes << 6) | (total & 0x0F)
            return bytes([lead]) + (total >> 4).to_bytes(extra_bytes, "little")
    raise AmlError(f"an AML package of {body_length} bytes is too long (limit {_PKG_LENGTH_MAX})")


def name_seg(segment: str) -> bytes:
    """A 4-character name segment, padded with '_' as iasl pads it."""
    if not 1 <= len(segment) <= 4 or not (segment[0].isupper() or segment[0] == "_"):
        raise AmlError(f"{segment!r} is not an AML name segment (1-4 characters, A-Z or _ first)")
    if not all(c.isupper() or c.isdigit() or c == "_" for c in segment):
        raise AmlError(f"{segment!r} is not an AML name segment (A-Z, 0-9 and _ only)")
    return segment.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """`\\_SB`, `_HID`, `\\_SB.V000`: an optional root prefix, then segments."""
    prefix = b"\\" if path.startswith("\\") else b""
    segments = [name_seg(s) for s in path.lstrip("\\").split(".")]
    if len(segments) == 1:
        return prefix + segments[0]
    if len(segments) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segments)
    return prefix + bytes([MULTI_NAME_PREFIX, len(segments)]) + b"".join(segments)


def integer(value: int) -> bytes:
    """The shortest encoding, as iasl optimises integers."""
    if value < 0 or value > _ONES:
        raise AmlError(f"{value} does not fit an AML integer (0 to 2**64-1)")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value == _ONES:
        return bytes([ONES_OP])
    for prefix, fmt in ((BYTE_PREFIX, "<B"), (WORD_PREFIX, "<H"), (DWORD_PREFIX, "<I")):
        if value < 1 << (8 * struct.calcsize(fmt)):
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    encoded = text.encode("ascii")
    if b"\0" in encoded:
        raise AmlError("an AML string may not contain NUL")
    return bytes([STRING_PREFIX]) + encoded + b"\0"


def eisa_id(text: str) -> bytes:
    """EISAID ("PNP0501"): three letters of 5 bits and four hex digits in a
    32-bit integer, stored byte-swapped, as iasl encodes it."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise AmlError(f"{text!r} is not an EISA id (three capital letters, four hex digits)")
    try:
        product = int(text[3:], 16)
    except ValueError:
        raise AmlError(f"{text!r} is not an EISA id (three capital letters, four hex digits)") from None
    vendor = ((ord(text[0]) - 0x40) << 10) | ((ord(text[1]) - 0x40) << 5) | (ord(text[2]) - 0x40)
    return integer(int.from_bytes(struct.pack(">HH", vendor, product), "little"))


def name(path: str, value: bytes) -> bytes:
    """Name (path, value): `value` is an encoded data object."""
    return bytes([NAME_OP]) + name_string(path) + value


def _with_pkg_length(opcode: bytes, body: bytes) -> bytes:
    return opcode + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    return _with_pkg_length(bytes([SCOPE_OP]), name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    return _with_pkg_length(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_string(path) + b"".join(terms))


def package(*elements: bytes) -> bytes:
    if len(elements) > 0xFF:
        raise AmlError(f"a Package holds at most 255 elements, not {len(elements)}")
    return _with_pkg_length(bytes([PACKAGE_OP]), bytes([len(elements)]) + b"".join(elements))


def buffer(data: bytes) -> bytes:
    return _with_pkg_length(bytes([BUFFER_OP]), integer(len(data)) + data)


def resource_template(*descriptors: bytes) -> bytes:
    """A Buffer of resource descriptors closed by an end tag (checksum 0: "the
    bytes are not checksummed", which is what iasl writes)."""
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))


def io_port(base: int, length: int) -> bytes:
    """IO (Decode16, base, base, 1, length): a fixed range of I/O ports."""
    return struct.pack("<BBHHBB", IO_PORT, IO_DECODE_16, base, base, 1, length)


def irq_no_flags(irq: int) -> bytes:
    """IRQNoFlags () {irq}: an ISA interrupt (edge, active high, exclusive)."""
    return struct.pack("<BH", IRQ_NO_FLAGS, 1 << irq)


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    """Memory32Fixed (ReadWrite|ReadOnly, base, length)."""
    return struct.pack("<BHBII", MEMORY32_FIXED, 9, int(writable), base, length)


def interrupt(gsi: int, edge: bool = True, active_low: bool = False, shared: bool = False) -> bytes:
    """Interrupt (ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared) {gsi}."""
    flags = 1 | (int(edge) << 1) | (int(active_low) << 2) | (int(shared) << 3)
    return struct.pack("<BHBBI", EXTENDED_INTERRUPT, 6, flags, 1, gsi)
