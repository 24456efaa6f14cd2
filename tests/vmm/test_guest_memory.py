"""Guest memory: layout, bounds-checked access, dirty logging driven by a real guest."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest

from flat_guest import power_off, write_guest
from snapvisor.vmm.builder import VmConfig, build_microvm_for_boot
from snapvisor.vmm.errors import GuestMemoryError
from snapvisor.vmm.kvm import Kvm
from snapvisor.vmm.memory import GuestMemory, plan_layout

MiB = 1 << 20
GiB = 1 << 30


def test_layout_small_vm_is_one_slot() -> None:
    assert plan_layout(256 * MiB) == [("ram0", 0, 0, 256 * MiB)]


def test_layout_leaves_the_mmio_hole_below_4g() -> None:
    assert plan_layout(5 * GiB) == [("ram0", 0, 0, 3 * GiB), ("ram1", 1, 4 * GiB, 2 * GiB)]
    assert plan_layout(3 * GiB) == [("ram0", 0, 0, 3 * GiB)]


def test_layout_rejects_sizes_that_are_not_pages() -> None:
    with pytest.raises(GuestMemoryError, match="multiple of 4 KiB"):
        plan_layout(4097)


@pytest.fixture
def memory(kvm: Kvm):
    vm_fd = kvm.create_vm()
    mem = GuestMemory.create(vm_fd, 8 * MiB)
    yield mem
    mem.close()
    vm_fd.close()


def test_regions_are_memfd_backed_and_writable(memory: GuestMemory) -> None:
    (region,) = memory.regions
    assert (region.name, region.slot, region.gpa, region.size) == ("ram0", 0, 0, 8 * MiB)
    assert region.fd >= 0 and not region.view.readonly
    region.view[0x1000:0x1004] = b"abcd"
    assert memory.read(0x1000, 4) == b"abcd"
    assert Path(f"/proc/self/fd/{region.fd}").resolve().name.startswith("memfd:snapvisor-ram0")


def test_read_write_round_trip_and_views_share_memory(memory: GuestMemory) -> None:
    memory.write(8 * MiB - 4, b"\x01\x02\x03\x04")
    assert memory.read(8 * MiB - 4, 4) == b"\x01\x02\x03\x04"
    view = memory.view(0x2000, 16)
    view[:] = bytes(range(16))
    assert memory.read(0x2000, 16) == bytes(range(16))


@pytest.mark.parametrize(
    "gpa,length",
    [(8 * MiB - 3, 4), (8 * MiB, 1), (-1, 2), (0xFEE00000, 4), (1 << 40, 8), (0, -1)],
)
def test_access_outside_ram_is_refused(memory: GuestMemory, gpa: int, length: int) -> None:
    with pytest.raises(GuestMemoryError):
        memory.view(gpa, length)


def test_fetch_dirty_needs_dirty_logging(memory: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError, match="enable_dirty_log"):
        memory.fetch_dirty(memory.regions[0])


def _store_byte(gpa: int, value: int) -> bytes:
    """mov byte [gpa], value (absolute 32-bit address)"""
    return b"\xc6\x04\x25" + struct.pack("<I", gpa) + bytes([value])


@pytest.mark.kvm
def test_dirty_log_reports_exactly_the_pages_the_guest_wrote(tmp_path: Path) -> None:
    written = [0x300, 0x301, 0x5FF, 0x7FF]  # page numbers in an 8 MiB guest
    code = b"".join(_store_byte(page * 4096 + 17, 0xAA) for page in written) + power_off(0)
    kernel = write_guest(tmp_path / "dirty.elf", code)
    vm = build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=8 * MiB, serial_out=io.BytesIO()))
    with vm:
        vm.memory.enable_dirty_log()
        vm.start()
        assert vm.wait(10).code == 0
        region = vm.memory.regions[0]
        dirty = vm.memory.fetch_dirty(region)
        assert dirty.dtype == bool and dirty.shape == (region.pages,)
        # Below 1 MiB the CPU sets accessed/dirty bits in the VMM's page tables;
        # above it, only the guest's own stores count.
        assert np.flatnonzero(dirty[256:]).tolist() == [page - 256 for page in written]
        assert not vm.memory.fetch_dirty(region).any()  # re-armed: nothing new since
        assert vm.memory.read(0x5FF * 4096 + 17, 1) == b"\xaa"
