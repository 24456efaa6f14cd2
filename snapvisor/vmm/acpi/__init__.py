"""ACPI tables in guest memory: where they go and how a guest finds them.

All of them live in the BIOS area [0xE0000, 0x100000), which the e820 map
reserves: the RSDP first, at 0xE0000 (16-byte aligned, inside the range
Linux scans for "RSD PTR " when boot_params.acpi_rsdp_addr is not used),
then XSDT, FADT, MADT and DSDT, each 16-byte aligned.
"""

from __future__ import annotations

from typing import Sequence

from snapvisor.vmm.acpi import tables
from snapvisor.vmm.acpi.tables import MmioDevice
from snapvisor.vmm.devices.acpi_sleep import SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT
from snapvisor.vmm.devices.i8042 import CMD_RESET_CPU, COMMAND_PORT
from snapvisor.vmm.errors import BootError
from snapvisor.vmm.memory import GuestMemory

RSDP_ADDR = 0xE0000
ACPI_AREA_END = 0x100000
_ALIGN = 16

__all__ = ["MmioDevice", "RSDP_ADDR", "build_acpi_tables", "write_acpi_tables"]


def _aligned(address: int) -> int:
    return (address + _ALIGN - 1) & ~(_ALIGN - 1)


def build_acpi_tables(vcpus: int, devices: Sequence[MmioDevice]) -> dict[int, bytes]:
    """{guest-physical address: table bytes}, RSDP at RSDP_ADDR. The IOAPIC's id
    follows the CPUs' APIC ids 0..vcpus-1, as in the MP table."""
    dsdt = tables.dsdt(devices)
    madt = tables.madt(vcpus, ioapic_id=vcpus)
    xsdt_addr = _aligned(RSDP_ADDR + len(tables.rsdp(0)))
    xsdt_size = len(tables.xsdt([0, 0]))
    fadt_addr = _aligned(xsdt_addr + xsdt_size)
    madt_addr = _aligned(fadt_addr + tables.FADT_LENGTH)
    dsdt_addr = _aligned(madt_addr + len(madt))
    if dsdt_addr + len(dsdt) > ACPI_AREA_END:
        raise BootError(f"the ACPI tables for {vcpus} vCPUs and {len(devices)} devices do not fit below 1 MiB")
    fadt = tables.fadt(dsdt_addr, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT, COMMAND_PORT, CMD_RESET_CPU)
    return {
        RSDP_ADDR: tables.rsdp(xsdt_addr),
        xsdt_addr: tables.xsdt([fadt_addr, madt_addr]),
        fadt_addr: fadt,
        madt_addr: madt,
        dsdt_addr: dsdt,
    }


def write_acpi_tables(memory: GuestMemory, vcpus: int, devices: Sequence[MmioDevice]) -> int:
    """Write every table; returns the RSDP's address (for boot_params.acpi_rsdp_addr)."""
    for address, table in build_acpi_tables(vcpus, devices).items():
        memory.write(address, table)
    return RSDP_ADDR
