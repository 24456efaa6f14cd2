"""The saved-state encoding and the compatibility check, without a VM."""

from __future__ import annotations

import struct

import pytest

from snapvisor.image.compat import IncompatibleSnapshot, check_compat, compat_record, parse_cpuid
from snapvisor.image.state_codec import StateCodecError, decode_state, encode_state


def cpuid_table(*entries: tuple[int, int, int, int, int, int]) -> bytes:
    """kvm_cpuid_entry2 records: (function, index, eax, ebx, ecx, edx)."""
    return b"".join(struct.pack("<7I12x", f, i, 0, a, b, c, d) for f, i, a, b, c, d in entries)


def test_state_round_trips_bytes_and_is_canonical() -> None:
    state = {"version": 1, "vcpus": [{"regs": b"\x00\xffraw", "mp_state": 0}], "name": "x", "none": None}
    encoded = encode_state(state)
    assert decode_state(encoded) == state
    assert encode_state(dict(reversed(list(state.items())))) == encoded


@pytest.mark.parametrize("bad", [b"\xff\xfe", b"[1, 2]", b'{"a": {"$b64": "!!"}}', b"{"])
def test_damaged_state_is_a_clear_error(bad: bytes) -> None:
    with pytest.raises(StateCodecError, match="damaged|malformed"):
        decode_state(bad)


def test_state_must_be_plain_data() -> None:
    with pytest.raises(StateCodecError, match="not plain data"):
        encode_state({"x": object()})


def test_compat_allows_subset_and_names_missing_bits() -> None:
    guest = cpuid_table((1, 0, 0, 0, 0b101, 0b1), (7, 0, 0, 0b10, 0, 0))
    record = compat_record(guest)
    assert record["cpu_features"] == {"0x1.0.ecx": 0b101, "0x1.0.edx": 1, "0x7.0.ebx": 0b10, "0x7.0.ecx": 0, "0x7.0.edx": 0}
    check_compat(record, cpuid_table((1, 0, 0, 0, 0b111, 0b11), (7, 0, 0, 0b110, 0, 0)), "abc")
    with pytest.raises(IncompatibleSnapshot, match=r"CPUID 0x7\.0\.ebx bits 1"):
        check_compat(record, cpuid_table((1, 0, 0, 0, 0b111, 0b11), (7, 0, 0, 0b100, 0, 0)), "abc")


def test_compat_ignores_osxsave_and_hypervisor_bits() -> None:
    record = compat_record(cpuid_table((1, 0, 0, 0, (1 << 27) | (1 << 31), 0)))
    check_compat(record, cpuid_table((1, 0, 0, 0, 0, 0)), "abc")


def test_compat_refuses_unreadable_record() -> None:
    with pytest.raises(IncompatibleSnapshot, match="no readable compatibility record"):
        check_compat({"image_format": "1"}, b"", "abc")
