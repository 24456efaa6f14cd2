"""The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI, such
as a microVM Linux, learns how many CPUs there are, where the IOAPIC is and
how the ISA interrupts are wired. Without it Linux boots one CPU only.

Placed in the last KiB of base memory (0x9fc00), which Linux scans and which
the e820 map reserves.
"""

from __future__ import annotations

import struct

from snapvisor.vmm.irqchip import IOAPIC_ADDR, LAPIC_ADDR
from snapvisor.vmm.memory import GuestMemory

MPTABLE_ADDR = 0x9FC00
MPTABLE_LIMIT = 0x400  # the scanned area: one KiB
ISA_IRQS = 16
ISA_BUS_ID = 0

_FLOATING_POINTER = struct.Struct("<4sIBBBB4x")
_HEADER = struct.Struct("<4sHBB8s12sIHHIHBx")
_PROCESSOR = struct.Struct("<BBBBII8x")
_BUS = struct.Struct("<BB6s")
_IOAPIC = struct.Struct("<BBBBI")
_INTERRUPT = struct.Struct("<BBHBBBB")

SPEC_REV = 4
ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IO_INTERRUPT, ENTRY_LOCAL_INTERRUPT = range(5)
CPU_ENABLED = 1 << 0
CPU_BSP = 1 << 1
LAPIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_SIGNATURE = 0x600  # family 6
CPU_FEATURES = (1 << 0) | (1 << 9)  # FPU, on-chip APIC
INT_VECTORED, INT_NMI, INT_EXTINT = 0, 1, 3
ALL_LAPICS = 0xFF


def _checksummed(data: bytearray, checksum_offset: int) -> bytearray:
    data[checksum_offset] = (-sum(data)) & 0xFF
    return data


def build_mptable(vcpus: int) -> bytes:
    ioapic_id = vcpus  # the first id after the CPUs' APIC ids 0..vcpus-1
    entries = [
        _PROCESSOR.pack(ENTRY_PROCESSOR, cpu, LAPIC_VERSION, CPU_ENABLED | (CPU_BSP if cpu == 0 else 0), CPU_SIGNATURE, CPU_FEATURES)
        for cpu in range(vcpus)
    ]
    entries.append(_BUS.pack(ENTRY_BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(_IOAPIC.pack(ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1, IOAPIC_ADDR))
    entries += [
        _INTERRUPT.pack(ENTRY_IO_INTERRUPT, INT_VECTORED, 0, ISA_BUS_ID, irq, ioapic_id, irq) for irq in range(ISA_IRQS)
    ]
    # The PIC reaches the BSP's LINT0 (virtual wire), NMIs every CPU's LINT1:
    # what the vCPU setup programs into each LAPIC.
    entries.append(_INTERRUPT.pack(ENTRY_LOCAL_INTERRUPT, INT_EXTINT, 0, ISA_BUS_ID, 0, 0, 0))
    entries.append(_INTERRUPT.pack(ENTRY_LOCAL_INTERRUPT, INT_NMI, 0, ISA_BUS_ID, 0, ALL_LAPICS, 1))
    body = b"".join(entries)
    header = bytearray(
        _HEADER.pack(b"PCMP", _HEADER.size + len(body), SPEC_REV, 0, b"SNAPVISR", b"MICROVM     ", 0, 0, len(entries), LAPIC_ADDR, 0, 0)
    )
    table = _checksummed(header + body, 7)
    pointer = _checksummed(
        bytearray(_FLOATING_POINTER.pack(b"_MP_", MPTABLE_ADDR + _FLOATING_POINTER.size, 1, SPEC_REV, 0, 0)), 10
    )
    return bytes(pointer + table)


def write_mptable(memory: GuestMemory, vcpus: int) -> None:
    table = build_mptable(vcpus)
    if len(table) > MPTABLE_LIMIT:
        raise ValueError(f"an MP table for {vcpus} vCPUs does not fit in the 1 KiB Linux scans")
    memory.write(MPTABLE_ADDR, table)
