"""The ACPI tables of a snapvisor VM (ACPI 6.5, chapter 5), built as bytes:
RSDP -> XSDT -> FADT (-> DSDT) and MADT.

The FADT declares a hardware-reduced platform: no PM1 blocks, no SCI, no
legacy fixed hardware; power-off goes through the sleep control register (an
I/O port, devices/acpi_sleep.py) with the `\\_S5` sleep type from the DSDT,
reset through the reset register (the i8042's 0xFE, as `reboot=k` does).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

from snapvisor.vmm.acpi import aml
from snapvisor.vmm.devices.acpi_sleep import SLEEP_TYPE_S5
from snapvisor.vmm.devices.i8042 import COMMAND_PORT as I8042_COMMAND_PORT
from snapvisor.vmm.devices.i8042 import DATA_PORT as I8042_DATA_PORT
from snapvisor.vmm.devices.i8042 import KEYBOARD_IRQ
from snapvisor.vmm.devices.rtc import CENTURY as RTC_CENTURY_INDEX  # Linux reads the century there
from snapvisor.vmm.devices.rtc import INDEX_PORT as RTC_PORT
from snapvisor.vmm.devices.rtc import PORT_COUNT as RTC_PORTS
from snapvisor.vmm.devices.serial import COM1_IRQ, COM1_PORT
from snapvisor.vmm.devices.serial import PORT_COUNT as COM1_PORTS
from snapvisor.vmm.irqchip import IOAPIC_ADDR, LAPIC_ADDR

OEM_ID = b"SNAPVS"
OEM_TABLE_ID = b"SNAPVISR"
OEM_REVISION = 1
CREATOR_ID = b"SNPV"
CREATOR_REVISION = 1

_HEADER = struct.Struct("<4sIBB6s8sI4sI")
HEADER_SIZE = _HEADER.size  # 36
_CHECKSUM_OFFSET = 9
_GAS = struct.Struct("<BBBBQ")  # Generic Address Structure
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1

RSDP_REVISION = 2
RSDP_V1_LENGTH = 20
_RSDP = struct.Struct("<8sB6sBIIQB3x")

FADT_REVISION = 6
FADT_MINOR_VERSION = 5
FADT_LENGTH = 276
FADT_FLAG_PWR_BUTTON = 1 << 4  # no fixed-feature power button
FADT_FLAG_SLP_BUTTON = 1 << 5  # no fixed-feature sleep button
FADT_FLAG_RESET_REG_SUP = 1 << 10
FADT_FLAG_HW_REDUCED_ACPI = 1 << 20
IAPC_BOOT_8042 = 1 << 1  # an i8042 is there: Linux probes it
IAPC_BOOT_VGA_NOT_PRESENT = 1 << 2
IAPC_BOOT_MSI_NOT_SUPPORTED = 1 << 3
# A hardware-reduced platform has no SCI and Linux sets none up there; 9 is
# a PC's usual value (0 would be taken for the timer's IRQ by older kernels).
SCI_INTERRUPT = 9

MADT_REVISION = 5
MADT_FLAG_PCAT_COMPAT = 1 << 0  # dual 8259s present (KVM's in-kernel PIC)
MADT_LOCAL_APIC, MADT_IOAPIC = 0, 1
LAPIC_ENABLED = 1 << 0

DSDT_REVISION = 2  # 64-bit AML integers
XSDT_REVISION = 1
VIRTIO_MMIO_HID = "LNRO0005"  # what Linux's virtio_mmio driver matches


@dataclass(frozen=True)
class MmioDevice:
    """A virtio-mmio window and its interrupt, as the DSDT describes it."""

    base: int
    size: int
    gsi: int


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` sum to zero (mod 256) once stored in it."""
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the common 36-byte header, then `body`."""
    table = bytearray(
        _HEADER.pack(
            signature, HEADER_SIZE + len(body), revision, 0, OEM_ID, OEM_TABLE_ID, OEM_REVISION, CREATOR_ID, CREATOR_REVISION
        )
        + body
    )
    table[_CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


def rsdp(xsdt_address: int) -> bytes:
    """The Root System Description Pointer (revision 2: XSDT only)."""
    pointer = bytearray(_RSDP.pack(b"RSD PTR ", 0, OEM_ID, RSDP_REVISION, 0, _RSDP.size, xsdt_address, 0))
    pointer[8] = checksum(pointer[:RSDP_V1_LENGTH])  # the ACPI 1.0 part
    pointer[32] = checksum(pointer)  # the whole structure
    return bytes(pointer)


def xsdt(table_addresses: Sequence[int]) -> bytes:
    return sdt(b"XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", address) for address in table_addresses))


def _gas_io_byte(port: int) -> bytes:
    return _GAS.pack(GAS_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE, port)


def fadt(dsdt_address: int, sleep_control_port: int, sleep_status_port: int, reset_port: int, reset_value: int) -> bytes:
    body = bytearray(FADT_LENGTH - HEADER_SIZE)

    def put(offset: int, fmt: str, *values: int) -> None:
        struct.pack_into(fmt, body, offset - HEADER_SIZE, *values)

    put(40, "<I", dsdt_address)
    put(46, "<H", SCI_INTERRUPT)
    put(108, "<B", RTC_CENTURY_INDEX)
    put(109, "<H", IAPC_BOOT_8042 | IAPC_BOOT_VGA_NOT_PRESENT | IAPC_BOOT_MSI_NOT_SUPPORTED)
    put(112, "<I", FADT_FLAG_PWR_BUTTON | FADT_FLAG_SLP_BUTTON | FADT_FLAG_RESET_REG_SUP | FADT_FLAG_HW_REDUCED_ACPI)
    body[116 - HEADER_SIZE : 128 - HEADER_SIZE] = _gas_io_byte(reset_port)
    put(128, "<B", reset_value)
    put(131, "<B", FADT_MINOR_VERSION)
    put(140, "<Q", dsdt_address)
    body[244 - HEADER_SIZE : 256 - HEADER_SIZE] = _gas_io_byte(sleep_control_port)
    body[256 - HEADER_SIZE : 268 - HEADER_SIZE] = _gas_io_byte(sleep_status_port)
    put(268, "<Q", int.from_bytes(b"SNAPVISR", "little"))  # hypervisor vendor identity
    return sdt(b"FACP", FADT_REVISION, bytes(body))


def madt(vcpus: int, ioapic_id: int) -> bytes:
    """One enabled local APIC per vCPU (APIC id = vCPU index) and the IOAPIC
    (GSIs 0-23, id `ioapic_id`).

    No interrupt source overrides: every ISA IRQ is the IOAPIC pin of the same
    number, edge-triggered and active high, which is what an ISA IRQ without
    an override means. A PC's IRQ0 -> GSI2 override would be wrong here: KVM's
    default GSI routing (which snapvisor keeps) wires the in-kernel PIT to
    pin 0, as the MP table says too; QEMU's override comes with its own
    routing table."""
    entries = [struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, LAPIC_ENABLED) for cpu in range(vcpus)]
    entries.append(struct.pack("<BBBBII", MADT_IOAPIC, 12, ioapic_id, 0, IOAPIC_ADDR, 0))
    return sdt(b"APIC", MADT_REVISION, struct.pack("<II", LAPIC_ADDR, MADT_FLAG_PCAT_COMPAT) + b"".join(entries))


def _legacy_devices() -> list[bytes]:
    """COM1, the i8042 and the RTC. Linux on a hardware-reduced platform sets
    up no ISA interrupts by itself: a device's IRQ works once ACPI describes
    it (its PNP driver then registers the interrupt)."""
    return [
        aml.device(
            "COM1",
            aml.name("_HID", aml.eisa_id("PNP0501")),
            aml.name("_UID", aml.integer(0)),
            aml.name("_CRS", aml.resource_template(aml.io_port(COM1_PORT, COM1_PORTS), aml.irq_no_flags(COM1_IRQ))),
        ),
        aml.device(
            "PS2K",
            aml.name("_HID", aml.eisa_id("PNP0303")),
            aml.name("_CRS", aml.resource_template(
                aml.io_port(I8042_DATA_PORT, 1), aml.io_port(I8042_COMMAND_PORT, 1), aml.irq_no_flags(KEYBOARD_IRQ)
            )),
        ),
        aml.device(
            "RTC",
            aml.name("_HID", aml.eisa_id("PNP0B00")),
            aml.name("_CRS", aml.resource_template(aml.io_port(RTC_PORT, RTC_PORTS))),
        ),
    ]


def dsdt_aml(devices: Sequence[MmioDevice]) -> bytes:
    """The DSDT's AML: the legacy devices, one LNRO0005 device per virtio-mmio
    window (Linux's virtio_mmio driver binds to it, no command line needed)
    and `\\_S5`."""
    virtio = [
        aml.device(
            f"V{index:03X}",
            aml.name("_HID", aml.string(VIRTIO_MMIO_HID)),
            aml.name("_UID", aml.integer(index)),
            aml.name("_CCA", aml.integer(1)),  # cache-coherent DMA
            aml.name("_CRS", aml.resource_template(aml.memory32_fixed(dev.base, dev.size), aml.interrupt(dev.gsi))),
        )
        for index, dev in enumerate(devices)
    ]
    terms = [aml.scope("_SB", *_legacy_devices(), *virtio)]
    terms.append(aml.name("_S5", aml.package(aml.integer(SLEEP_TYPE_S5), aml.integer(0))))
    return b"".join(terms)


def dsdt(devices: Sequence[MmioDevice]) -> bytes:
    return sdt(b"DSDT", DSDT_REVISION, dsdt_aml(devices))
