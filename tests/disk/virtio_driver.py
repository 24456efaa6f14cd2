"""A virtio-blk driver written from the guest's side, for tests: it sets the
device up through its MMIO registers like a guest would and builds requests in
real guest memory (a GuestMemory of a real KVM VM). Module name unique: every
test directory is on sys.path."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from snapvisor.vmm.devices.blockfile import BlockFile
from snapvisor.vmm.devices.virtio.block import VirtioBlock
from snapvisor.vmm.devices.virtio.mmio import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    Reg,
    VirtioMmioTransport,
)
from snapvisor.vmm.kvm import Kvm, VmFd
from snapvisor.vmm.memory import GuestMemory

MiB = 1 << 20
QSIZE = 16
DESC_GPA = 0x10000
AVAIL_GPA = 0x11000
USED_GPA = 0x12000
HEADER_GPA = 0x13000
STATUS_GPA = 0x14000
DATA_GPA = 0x100000
VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE = 1, 2
STATUS_ALL_OK = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
NEEDS_RESET = STATUS_NEEDS_RESET


@dataclass
class Rig:
    kvm: Kvm
    vm_fd: VmFd
    memory: GuestMemory
    disk: BlockFile
    transport: VirtioMmioTransport
    interrupts: list[int]

    def reg(self, offset: int) -> int:
        return self.transport.read(offset, 4)

    def set_reg(self, offset: int, value: int) -> None:
        self.transport.write(offset, 4, value)

    def setup(self, features: int = VIRTIO_F_VERSION_1, qsize: int = QSIZE, interrupts: bool = True) -> int:
        """The driver's initialisation sequence; returns the status register after it."""
        self.set_reg(Reg.STATUS, 0)
        self.set_reg(Reg.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        for sel in (0, 1):
            self.set_reg(Reg.DRIVER_FEATURES_SEL, sel)
            self.set_reg(Reg.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.set_reg(Reg.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        if not self.reg(Reg.STATUS) & STATUS_FEATURES_OK:
            return self.reg(Reg.STATUS)
        self.set_reg(Reg.QUEUE_SEL, 0)
        self.set_reg(Reg.QUEUE_NUM, qsize)
        for low, gpa in ((Reg.QUEUE_DESC_LOW, DESC_GPA), (Reg.QUEUE_DRIVER_LOW, AVAIL_GPA), (Reg.QUEUE_DEVICE_LOW, USED_GPA)):
            self.set_reg(low, gpa & 0xFFFFFFFF)
            self.set_reg(low + 4, gpa >> 32)
        self.memory.write(AVAIL_GPA, struct.pack("<HH", 0 if interrupts else 1, 0))
        self.memory.write(USED_GPA, bytes(4))
        self.set_reg(Reg.QUEUE_READY, 1)
        self.set_reg(Reg.STATUS, STATUS_ALL_OK)
        self.avail_idx = 0
        return self.reg(Reg.STATUS)

    def put_desc(self, index: int, gpa: int, length: int, flags: int, next_index: int = 0) -> None:
        self.memory.write(DESC_GPA + 16 * index, struct.pack("<QIHH", gpa, length, flags, next_index))

    def offer(self, head: int) -> None:
        self.memory.write(AVAIL_GPA + 4 + 2 * (self.avail_idx % QSIZE), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write(AVAIL_GPA + 2, struct.pack("<H", self.avail_idx))

    def notify(self) -> None:
        self.set_reg(Reg.QUEUE_NOTIFY, 0)

    def used_idx(self) -> int:
        return struct.unpack("<H", self.memory.read(USED_GPA + 2, 2))[0]

    def used_elem(self, slot: int) -> tuple[int, int]:
        return struct.unpack("<II", self.memory.read(USED_GPA + 4 + 8 * (slot % QSIZE), 8))

    def request(self, kind: int, sector: int, length: int, data: bytes = b"") -> tuple[int, int, bytes]:
        """One three-descriptor request; returns (status, used length, data read)."""
        self.memory.write(HEADER_GPA, struct.pack("<IIQ", kind, 0, sector))
        self.memory.write(STATUS_GPA, b"\xee")
        if data:
            self.memory.write(DATA_GPA, data)
        writes_data = kind in (0, 8)
        self.put_desc(0, HEADER_GPA, 16, VIRTQ_DESC_F_NEXT, 1)
        self.put_desc(1, DATA_GPA, length, VIRTQ_DESC_F_NEXT | (VIRTQ_DESC_F_WRITE if writes_data else 0), 2)
        self.put_desc(2, STATUS_GPA, 1, VIRTQ_DESC_F_WRITE)
        before = self.used_idx()
        self.offer(0)
        self.notify()
        assert self.used_idx() == (before + 1) & 0xFFFF, "the device did not complete the request"
        head, written = self.used_elem(before)
        assert head == 0
        return self.memory.read(STATUS_GPA, 1)[0], written, self.memory.read(DATA_GPA, length)


def make_rig(tmp_path: Path, disk_size: int = 1 * MiB, readonly: bool = False, mem_size: int = 2 * MiB) -> Rig:
    image = tmp_path / "disk.img"
    if not image.exists():
        image.write_bytes(b"")
        os.truncate(image, disk_size)
    kvm = Kvm.open()
    vm_fd = kvm.create_vm()
    memory = GuestMemory.create(vm_fd, mem_size)
    memory.enable_dirty_log()
    disk = BlockFile(image, readonly=readonly)
    interrupts: list[int] = []
    transport = VirtioMmioTransport(VirtioBlock("vda", disk), memory, lambda: interrupts.append(1))
    return Rig(kvm, vm_fd, memory, disk, transport, interrupts)


def close_rig(rig: Rig) -> None:
    rig.transport.close()
    rig.memory.close()
    rig.vm_fd.close()
    rig.kvm.close()
