"""ACPI tables: the AML encoder against iasl (Debian's acpica-tools) byte for
byte, every table's checksum and `iasl -d`, and on /dev/kvm the tables a
booted VM carries and the ACPI power-off."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from flat_guest import elf_image, out_byte, power_off
from snapvisor.vmm.acpi import RSDP_ADDR, MmioDevice, aml, build_acpi_tables, tables
from snapvisor.vmm.builder import VmConfig, build_microvm_for_boot
from snapvisor.vmm.devices.blockfile import DiskConfig
from snapvisor.vmm.devices.virtio.mmio import MMIO_WINDOW, mmio_window
from snapvisor.vmm.loader import x86

IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(IASL is None, reason="iasl is missing (apt-get install acpica-tools; scripts/setup --test does)")
MiB = 1 << 20


def _devices(count: int) -> list[MmioDevice]:
    windows = [mmio_window(i) for i in range(count)]
    return [MmioDevice(base, MMIO_WINDOW, irq) for base, irq in windows]


def _asl(devices: list[MmioDevice]) -> str:
    """The DSDT that tables.dsdt() builds, written in ASL by hand."""
    body = "".join(
        f"""
            Device (V{index:03X}) {{
                Name (_HID, "LNRO0005")
                Name (_UID, {index})
                Name (_CCA, One)
                Name (_CRS, ResourceTemplate () {{
                    Memory32Fixed (ReadWrite, {dev.base:#x}, {dev.size:#x})
                    Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {{ {dev.gsi} }}
                }})
            }}"""
        for index, dev in enumerate(devices)
    )
    legacy = """
            Device (COM1) {
                Name (_HID, EisaId ("PNP0501"))
                Name (_UID, Zero)
                Name (_CRS, ResourceTemplate () { IO (Decode16, 0x3F8, 0x3F8, 1, 8) IRQNoFlags () {4} })
            }
            Device (PS2K) {
                Name (_HID, EisaId ("PNP0303"))
                Name (_CRS, ResourceTemplate () { IO (Decode16, 0x60, 0x60, 1, 1) IO (Decode16, 0x64, 0x64, 1, 1) IRQNoFlags () {1} })
            }
            Device (RTC) {
                Name (_HID, EisaId ("PNP0B00"))
                Name (_CRS, ResourceTemplate () { IO (Decode16, 0x70, 0x70, 1, 2) })
            }"""
    return f"""DefinitionBlock ("", "DSDT", 2, "SNAPVS", "SNAPVISR", 1) {{
        Scope (\\_SB) {{{legacy}{body}
        }}
        Name (_S5, Package () {{ 5, 0 }})
    }}
    """


def _iasl(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    assert IASL is not None
    return subprocess.run([IASL, *args], cwd=tmp_path, capture_output=True, text=True, check=False)


@needs_iasl
@pytest.mark.parametrize("count", [0, 1, 3, 16])  # the scope's PkgLength takes 2 bytes
def test_dsdt_aml_matches_iasl_byte_for_byte(tmp_path: Path, count: int) -> None:
    devices = _devices(count)
    (tmp_path / "dsdt.asl").write_text(_asl(devices))
    result = _iasl(tmp_path, "-p", "dsdt", "dsdt.asl")
    assert result.returncode == 0, result.stdout + result.stderr
    compiled = (tmp_path / "dsdt.aml").read_bytes()
    ours = tables.dsdt(devices)
    assert ours[tables.HEADER_SIZE :] == compiled[tables.HEADER_SIZE :]
    assert len(ours) == struct.unpack_from("<I", compiled, 4)[0]


@pytest.mark.parametrize("vcpus, devices", [(1, 0), (2, 1), (2, 16), (64, 16)])
def test_every_table_checksums_to_zero(vcpus: int, devices: int) -> None:
    built = build_acpi_tables(vcpus, _devices(devices))
    rsdp = built[RSDP_ADDR]
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    for address, table in built.items():
        if address != RSDP_ADDR:
            assert struct.unpack_from("<I", table, 4)[0] == len(table)
            assert sum(table) % 256 == 0, table[:4]
        assert address % 16 == 0 and 0xE0000 <= address and address + len(table) <= 0x100000


@needs_iasl
def test_iasl_disassembles_every_table_without_errors(tmp_path: Path) -> None:
    built = build_acpi_tables(2, _devices(2))
    for table in list(built.values())[1:]:
        name = table[:4].decode()
        (tmp_path / f"{name}.dat").write_bytes(table)
        result = _iasl(tmp_path, "-d", f"{name}.dat")
        output = result.stdout + result.stderr
        assert result.returncode == 0 and "Error" not in output and "Invalid" not in output, output
        assert (tmp_path / f"{name}.dsl").is_file()
    madt = (tmp_path / "APIC.dsl").read_text()
    assert madt.count("Subtable Type : 00 [Processor Local APIC]") == 2
    assert "Subtable Type : 01 [I/O APIC]" in madt and "Address : FEC00000" in madt
    fadt = (tmp_path / "FACP.dsl").read_text()
    assert "Hardware Reduced (V5) : 1" in fadt


@pytest.mark.parametrize(
    "length, encoded",
    [(0, b"\x01"), (0x3E, b"\x3f"), (0x3F, b"\x41\x04"), (0xFFD, b"\x4f\xff"), (0xFFE, b"\x81\x00\x01"),
     (0xFFFFC, b"\x8f\xff\xff"), (0xFFFFD, b"\xc1\x00\x00\x01")],
)
def test_pkg_length_counts_its_own_bytes(length: int, encoded: bytes) -> None:
    assert aml.pkg_length(length) == encoded


@pytest.mark.parametrize(
    "value, encoded",
    [(0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0x100, b"\x0b\x00\x01"), (0x10000, b"\x0c\x00\x00\x01\x00"),
     (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little")), ((1 << 64) - 1, b"\xff")],
)
def test_integers_take_the_shortest_form(value: int, encoded: bytes) -> None:
    assert aml.integer(value) == encoded


@pytest.mark.parametrize("bad", ["", "TOOLONG", "1ABC", "a_b", "AB-C"])
def test_bad_name_segments_are_refused(bad: str) -> None:
    with pytest.raises(aml.AmlError, match="name segment"):
        aml.name_seg(bad)


@pytest.mark.parametrize("bad", ["PNP050", "pnp0501", "PNP05G1", "1NP0501"])
def test_bad_eisa_ids_are_refused(bad: str) -> None:
    with pytest.raises(aml.AmlError, match="EISA id"):
        aml.eisa_id(bad)


def test_name_strings() -> None:
    assert aml.name_string("\\_SB") == b"\\_SB_"
    assert aml.name_string("_SB.V000") == b"\x2e_SB_V000"
    assert aml.name_string("\\A.B.C") == b"\\\x2f\x03A___B___C___"


def _find_rsdp(memory) -> int:
    """Linux's legacy scan of the BIOS area: 16-byte steps, signature and checksum."""
    area = memory.read(0xE0000, 0x20000)
    for offset in range(0, len(area), 16):
        if area[offset : offset + 8] == b"RSD PTR " and sum(area[offset : offset + 20]) % 256 == 0:
            return 0xE0000 + offset
    raise AssertionError("no RSDP in 0xE0000-0xFFFFF")


@pytest.mark.kvm
@needs_iasl
def test_a_booted_vm_carries_tables_a_guest_finds(tmp_path: Path) -> None:
    """Through guest memory as Linux walks it: boot_params.acpi_rsdp_addr and the
    legacy scan agree, RSDP -> XSDT -> FADT -> DSDT and MADT, each one parsed by iasl."""
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(power_off(0)))
    disks = []
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(bytes(MiB))
        disks.append(DiskConfig(tmp_path / name))
    with build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=64 * MiB, vcpus=2, disks=disks)) as vm:
        memory = vm.memory
        rsdp_addr = struct.unpack("<Q", memory.read(x86.ZERO_PAGE_ADDR + x86.BP_ACPI_RSDP_ADDR, 8))[0]
        assert rsdp_addr == _find_rsdp(memory)
        e820 = [(a, a + s, t) for a, s, t in x86.e820_map(memory)]
        assert any(a <= rsdp_addr and rsdp_addr + 0x20000 <= e and t == x86.E820_RESERVED for a, e, t in e820)

        def table_at(address: int) -> bytes:
            return memory.read(address, struct.unpack("<I", memory.read(address + 4, 4))[0])

        xsdt = table_at(struct.unpack("<Q", memory.read(rsdp_addr + 24, 8))[0])
        found = {t[:4]: t for t in (table_at(a) for a in struct.unpack_from("<2Q", xsdt, 36))}
        found[b"DSDT"] = table_at(struct.unpack_from("<Q", found[b"FACP"], 140)[0])
    assert sorted(found) == [b"APIC", b"DSDT", b"FACP"]
    for signature, table in found.items():
        (tmp_path / f"{signature.decode()}.dat").write_bytes(table)
        result = _iasl(tmp_path, "-d", f"{signature.decode()}.dat")
        assert result.returncode == 0 and "Error" not in result.stdout + result.stderr
    dsdt = (tmp_path / "DSDT.dsl").read_text()
    assert dsdt.count('Name (_HID, "LNRO0005")') == 2
    assert "0xD0001000" in dsdt and "0x00000006," in dsdt


@pytest.mark.kvm
@pytest.mark.parametrize(
    "value, stops",
    [(0x34, True), (0x14, False), (0x30, False)],  # S5|SLP_EN; S5 without SLP_EN; SLP_EN with type 4
)
def test_acpi_sleep_register_powers_off_on_s5_only(tmp_path: Path, value: int, stops: bool) -> None:
    """What Linux's poweroff writes on a hardware-reduced platform: WAK_STS to the
    status register, then SLP_TYP=5|SLP_EN to the control register."""
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(out_byte(0x505, 0x80) + out_byte(0x504, value) + power_off(77)))
    with build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=64 * MiB, serial_out=subprocess.DEVNULL)) as vm:
        vm.start()
        status = vm.wait(10)
    assert status is not None
    expected = (0, "poweroff", "the guest powered off (ACPI S5)") if stops else (77, "poweroff")
    assert (status.code, status.reason, status.message)[: len(expected)] == expected
