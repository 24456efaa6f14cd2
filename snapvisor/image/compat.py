"""The compatibility record of a snapshot, and the check made before restoring one.

A snapshot says which image format wrote it, which snapvisor and host kernel, and
which CPU features its guest was shown (from the CPUID table set on its vCPUs).
A host may restore it when the format's major version is ours and KVM here can
show the guest every one of those features: a guest that already decided to use
AVX-512 must not wake up on a CPU without it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from snapvisor import __version__
from snapvisor.errors import SnapvisorError

# Major changes when a restore by an older snapvisor would be wrong; minor when
# new fields are only additions an older reader may ignore.
IMAGE_FORMAT_MAJOR = 1
IMAGE_FORMAT_MINOR = 0

# The CPUID registers that carry feature flags: (function, index, register).
FEATURE_WORDS: tuple[tuple[int, int, str], ...] = (
    (0x1, 0, "ecx"),
    (0x1, 0, "edx"),
    (0x7, 0, "ebx"),
    (0x7, 0, "ecx"),
    (0x7, 0, "edx"),
    (0xD, 1, "eax"),
    (0x80000001, 0, "ecx"),
    (0x80000001, 0, "edx"),
)
# Bits that describe the running CPU rather than a capability (OSXSAVE follows
# CR4, the hypervisor bit is ours to set), so they never block a restore.
_IGNORED_BITS = {(0x1, 0, "ecx"): (1 << 27) | (1 << 31)}

_ENTRY = struct.Struct("<7I12x")  # struct kvm_cpuid_entry2


class IncompatibleSnapshot(SnapvisorError):
    """The snapshot cannot run on this host or with this snapvisor."""


@dataclass(frozen=True)
class CpuidEntry:
    function: int
    index: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def parse_cpuid(raw: bytes) -> list[CpuidEntry]:
    """The entries of a CPUID table given as the bytes of its `struct kvm_cpuid_entry2` array."""
    if len(raw) % _ENTRY.size:
        raise IncompatibleSnapshot(f"a CPUID table of {len(raw)} bytes is not whole entries; the snapshot is damaged")
    return [
        CpuidEntry(function, index, eax, ebx, ecx, edx)
        for function, index, _flags, eax, ebx, ecx, edx in _ENTRY.iter_unpack(raw)
    ]


def feature_words(entries: list[CpuidEntry]) -> dict[str, int]:
    """The feature-flag registers as {"0x7.0.ebx": value}."""
    words: dict[str, int] = {}
    lookup = {(e.function, e.index): e for e in entries}
    for function, index, register in FEATURE_WORDS:
        entry = lookup.get((function, index))
        if entry is not None:
            words[f"{function:#x}.{index}.{register}"] = getattr(entry, register)
    return words


def compat_record(guest_cpuid: bytes) -> dict:
    uname = os.uname()
    return {
        "image_format": {"major": IMAGE_FORMAT_MAJOR, "minor": IMAGE_FORMAT_MINOR},
        "snapvisor": __version__,
        "host": {"kernel": uname.release, "machine": uname.machine},
        "cpu_features": feature_words(parse_cpuid(guest_cpuid)),
    }


def check_compat(record: dict, host_cpuid: bytes, snapshot_name: str) -> None:
    """Raise IncompatibleSnapshot, naming what is missing, unless this host can run it."""
    try:
        major = int(record["image_format"]["major"])
        minor = int(record["image_format"]["minor"])
        wanted = {str(k): int(v) for k, v in record["cpu_features"].items()}
    except (KeyError, TypeError, ValueError):
        raise IncompatibleSnapshot(
            f"snapshot {snapshot_name} has no readable compatibility record; it was not written by snapvisor "
            f"or is damaged (run `snapvisor verify`)"
        ) from None
    if major != IMAGE_FORMAT_MAJOR:
        newer = major > IMAGE_FORMAT_MAJOR
        raise IncompatibleSnapshot(
            f"snapshot {snapshot_name} uses image format {major}.{minor}, this snapvisor {__version__} reads "
            f"{IMAGE_FORMAT_MAJOR}.x: "
            + ("upgrade snapvisor on this host to restore it" if newer else "restore it with an older snapvisor")
        )
    host = feature_words(parse_cpuid(host_cpuid))
    missing = []
    for word, value in sorted(wanted.items()):
        function, index, register = word.split(".")
        ignored = _IGNORED_BITS.get((int(function, 16), int(index), register), 0)
        lacking = value & ~host.get(word, 0) & ~ignored
        if lacking:
            bits = ", ".join(str(bit) for bit in range(32) if lacking >> bit & 1)
            missing.append(f"CPUID {word} bits {bits}")
    if missing:
        raise IncompatibleSnapshot(
            f"snapshot {snapshot_name} needs CPU features this host's KVM cannot give its guest "
            f"({'; '.join(missing)}): restore it on a host with the same or a newer CPU"
        )
