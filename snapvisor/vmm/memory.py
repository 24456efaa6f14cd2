"""Guest physical memory: memfd-backed (or file-backed) host mappings registered
as KVM memslots, bounds-checked guest-physical access, and per-slot dirty logging.

Layout (docs/architecture.md): RAM from GPA 0 up to min(size, 3 GiB) is region
"ram0" in slot 0; the rest continues at 4 GiB as "ram1" in slot 1, leaving
3-4 GiB as the MMIO hole (LAPIC, IOAPIC, virtio-mmio devices).
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from snapvisor.vmm.errors import GuestMemoryError
from snapvisor.vmm.extents import populated_pages
from snapvisor.vmm.kvm import VmFd, ffi
from snapvisor.vmm.kvm import bindings as b

if TYPE_CHECKING:
    import numpy as np

PAGE_SIZE = 4096
MMIO_HOLE_START = 3 << 30
MMIO_HOLE_END = 4 << 30
STATE_VERSION = 1


@dataclass(frozen=True)
class FileBacking:
    """Map a region privately (copy-on-write) from a file instead of a fresh memfd;
    the file is never written. Used to start a restored VM straight from an image."""

    path: Path
    offset: int = 0


@dataclass
class MemoryRegion:
    name: str
    slot: int
    gpa: int
    size: int
    view: memoryview  # writable view of the whole host mapping
    fd: int  # the memfd (or the backing file, opened read-only)
    flags: int = 0  # current memslot flags
    private_file: bool = False  # mapped copy-on-write from a file: the file does not show guest writes
    _mapping: mmap.mmap | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    def populated_pages(self) -> np.ndarray:
        """Bool array of the pages that may hold data: a memfd's holes were never
        written and read as zeros (and reading them would allocate them)."""
        if self.private_file:
            return np.ones(self.pages, dtype=bool)
        return populated_pages(self.fd, self.size, PAGE_SIZE)

    @property
    def host_address(self) -> int:
        return int(ffi.cast("uintptr_t", ffi.from_buffer(self.view)))


def plan_layout(mem_size: int) -> list[tuple[str, int, int, int]]:
    """(name, slot, gpa, size) for each RAM region of a VM with `mem_size` bytes."""
    if mem_size <= 0 or mem_size % PAGE_SIZE:
        raise GuestMemoryError(f"memory size {mem_size} must be a positive multiple of 4 KiB")
    low = min(mem_size, MMIO_HOLE_START)
    layout = [("ram0", 0, 0, low)]
    if mem_size > low:
        layout.append(("ram1", 1, MMIO_HOLE_END, mem_size - low))
    return layout


class GuestMemory:
    """All RAM regions of one VM."""

    def __init__(self, vm_fd: VmFd, regions: list[MemoryRegion]) -> None:
        self._vm_fd = vm_fd
        self.regions = regions
        self._manual_protect = False
        self.dirty_log_enabled = False
        # Pages the VMM itself wrote (devices filling read buffers and used rings):
        # KVM's dirty log only sees vCPU writes, so writers mark these here and
        # fetch_dirty() merges them. One byte per page per region.
        self._vmm_dirty = {region.name: bytearray(region.pages) for region in regions}
        self._vmm_dirty_lock = threading.Lock()
        # Set while RAM is being filled lazily (image/lazy.py): called with (region,
        # offset, length) before the VMM touches guest RAM, to bring it in first.
        self.before_access: Callable[[MemoryRegion, int, int], None] | None = None

    # --- construction ----------------------------------------------------
    @classmethod
    def create(
        cls,
        vm_fd: VmFd,
        mem_size: int,
        backing: Mapping[str, FileBacking] | None = None,
        prefault: bool = False,
    ) -> "GuestMemory":
        regions: list[MemoryRegion] = []
        memory = cls(vm_fd, regions)
        try:
            for name, slot, gpa, size in plan_layout(mem_size):
                source = (backing or {}).get(name)
                region = _map_file(name, slot, gpa, size, source) if source else _map_memfd(
                    name, slot, gpa, size, prefault
                )
                regions.append(region)
                memory._vmm_dirty[name] = bytearray(region.pages)
                vm_fd.set_user_memory_region(slot, 0, gpa, size, region.host_address)
        except BaseException:
            memory.close()
            raise
        return memory

    @property
    def size(self) -> int:
        return sum(region.size for region in self.regions)

    def close(self) -> None:
        for region in self.regions:
            region.view.release()
            if region._mapping is not None:
                try:
                    region._mapping.close()
                except BufferError:
                    # A caller still holds a view; the mapping goes with it.
                    pass
                region._mapping = None
            if region.fd >= 0:
                os.close(region.fd)
                region.fd = -1
        self.regions = []

    # --- bounds-checked access ---------------------------------------------
    def _locate(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"invalid guest range {gpa:#x}+{length:#x}")
        for region in self.regions:
            if region.gpa <= gpa and gpa + length <= region.end:
                return region, gpa - region.gpa
        raise GuestMemoryError(
            f"guest range {gpa:#x}..{gpa + length:#x} is not inside guest RAM "
            f"({', '.join(f'{r.gpa:#x}..{r.end:#x}' for r in self.regions)})"
        )

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview of guest RAM [gpa, gpa+length); no copy. A caller
        that writes guest RAM through it calls mark_dirty() afterwards."""
        region, offset = self._locate(gpa, length)
        if self.before_access is not None:
            self.before_access(region, offset, length)
        return region.view[offset : offset + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data
        self.mark_dirty(gpa, len(data))

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Record that the VMM wrote guest RAM [gpa, gpa+length), after the write:
        a fetch in between reports the page on the next fetch instead."""
        if length <= 0:
            return
        region, offset = self._locate(gpa, length)
        first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
        with self._vmm_dirty_lock:
            self._vmm_dirty[region.name][first : last + 1] = b"\x01" * (last + 1 - first)

    def contains(self, gpa: int, length: int) -> bool:
        return any(r.gpa <= gpa and gpa + length <= r.end for r in self.regions)

    # --- dirty logging --------------------------------------------------------
    def enable_dirty_log(self) -> None:
        """Start tracking writes on every slot; the first fetch reports pages
        written since this call. Uses manual protect (get + clear in two steps,
        cheaper for large slots) when the kernel offers it."""
        if self.dirty_log_enabled:
            return
        if self._vm_fd.check_extension(b.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) & b.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            self._vm_fd.enable_cap(b.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, b.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
            self._manual_protect = True
        for region in self.regions:
            self._set_flags(region, region.flags | b.KVM_MEM_LOG_DIRTY_PAGES)
        self.dirty_log_enabled = True

    def disable_dirty_log(self) -> None:
        for region in self.regions:
            self._set_flags(region, region.flags & ~b.KVM_MEM_LOG_DIRTY_PAGES)
        self.dirty_log_enabled = False

    def _set_flags(self, region: MemoryRegion, flags: int) -> None:
        self._vm_fd.set_user_memory_region(region.slot, flags, region.gpa, region.size, region.host_address)
        region.flags = flags

    def fetch_dirty(self, region: MemoryRegion) -> "np.ndarray":
        """Bool array, one entry per 4 KiB page of `region`, of pages written since
        the previous fetch (or since enable_dirty_log), by vCPUs or by the VMM
        (mark_dirty), and re-arms tracking."""
        import numpy as np  # imported here: booting a VM does not need numpy's ~100 ms import

        if not region.flags & b.KVM_MEM_LOG_DIRTY_PAGES:
            raise GuestMemoryError(f"dirty logging is not enabled on {region.name}: call enable_dirty_log() first")
        words = (region.pages + 63) // 64
        bitmap = np.zeros(words, dtype=np.uint64)
        pointer = ffi.from_buffer("uint64_t[]", bitmap)
        self._vm_fd.get_dirty_log(region.slot, pointer)
        if self._manual_protect and bitmap.any():
            # Clears exactly the bits we were given, and write-protects those pages again.
            self._vm_fd.clear_dirty_log(region.slot, 0, region.pages, pointer)
        with self._vmm_dirty_lock:
            by_vmm = bytes(self._vmm_dirty[region.name])
            self._vmm_dirty[region.name][:] = bytes(region.pages)
        dirty = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[: region.pages].astype(bool)
        return dirty | np.frombuffer(by_vmm, dtype=np.uint8).astype(bool)

    # --- persistence -----------------------------------------------------------
    def save(self) -> dict:
        return {
            "version": STATE_VERSION,
            "regions": [{"name": r.name, "slot": r.slot, "gpa": r.gpa, "size": r.size} for r in self.regions],
        }


def _map_memfd(name: str, slot: int, gpa: int, size: int, prefault: bool) -> MemoryRegion:
    fd = os.memfd_create(f"snapvisor-{name}", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if prefault else 0)
        mapping = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        os.close(fd)
        raise GuestMemoryError(f"cannot allocate {size >> 20} MiB of guest RAM for {name}: {exc.strerror}") from None
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return MemoryRegion(name, slot, gpa, size, memoryview(mapping), fd, _mapping=mapping)


def _map_file(name: str, slot: int, gpa: int, size: int, source: FileBacking) -> MemoryRegion:
    try:
        fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise GuestMemoryError(f"cannot open memory image {source.path} for {name}: {exc.strerror}") from None
    try:
        file_size = os.fstat(fd).st_size
        if source.offset + size > file_size:
            raise GuestMemoryError(
                f"memory image {source.path} holds {file_size} bytes, {name} needs {size} from offset {source.offset}"
            )
        mapping = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE, offset=source.offset)
    except BaseException:
        os.close(fd)
        raise
    return MemoryRegion(name, slot, gpa, size, memoryview(mapping), fd, private_file=True, _mapping=mapping)

