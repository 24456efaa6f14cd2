"""virtio-blk (device id 2) over a raw image file: read, write, flush, get-id.

Each request is one chain: a 16-byte header (type, reserved, sector) in the
device-readable part, the data, and one status byte at the very end of the
device-writable part. A request that does not fit that shape, asks for sectors
past the end of the disk, or writes to a read-only disk completes with
VIRTIO_BLK_S_IOERR (or UNSUPP for an unknown type); only a broken queue (see
queue.py) makes the device need a reset.
"""

from __future__ import annotations

import struct

from snapvisor.vmm.devices.blockfile import SECTOR_SIZE, BlockFile
from snapvisor.vmm.devices.virtio.mmio import VIRTIO_F_VERSION_1
from snapvisor.vmm.devices.virtio.queue import Buffer, Chain, Virtqueue
from snapvisor.vmm.memory import GuestMemory
from snapvisor.vmm.persist import upgraded

DEVICE_ID_BLOCK = 2
STATE_VERSION = 1

VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_FLUSH = 1 << 9

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

ID_BYTES = 20
_HEADER = struct.Struct("<IIQ")  # type, reserved, sector


class VirtioBlock:
    device_id = DEVICE_ID_BLOCK
    queue_count = 1

    def __init__(self, name: str, disk: BlockFile) -> None:
        self.name = name  # vda, vdb, ...: also the disk's region name in snapshots (disk-<name>)
        self.disk = disk
        self.features = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | (VIRTIO_BLK_F_RO if disk.readonly else 0)
        self._config = struct.pack("<Q", disk.size // SECTOR_SIZE)  # capacity in 512-byte sectors
        self.requests = 0

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self._config[offset : offset + size].ljust(size, b"\0"), "little")

    def process(self, memory: GuestMemory, index: int, queue: Virtqueue) -> bool:
        used = False
        while (chain := queue.pop(memory)) is not None:
            queue.push(memory, chain.head, self._serve(memory, chain))
            used = True
        return used

    def _serve(self, memory: GuestMemory, chain: Chain) -> int:
        """Carry out one request; returns the bytes written into the chain."""
        writable_total = sum(b.length for b in chain.writable)
        if writable_total == 0:
            return 0  # nowhere to put a status: the driver learns nothing, the VMM does nothing
        status_buffer = _split_tail(chain.writable)
        data_in = _truncate(chain.writable, writable_total - 1)
        header = _gather(memory, chain.readable, _HEADER.size)
        if header is None:
            return self._complete(memory, status_buffer, VIRTIO_BLK_S_IOERR)
        kind, _, sector = _HEADER.unpack(header)
        data_out = _skip(chain.readable, _HEADER.size)
        self.requests += 1
        if kind == VIRTIO_BLK_T_IN:
            status = self._read(memory, sector, data_in)
            written = sum(b.length for b in data_in) if status == VIRTIO_BLK_S_OK else 0
            return written + self._complete(memory, status_buffer, status)
        if kind == VIRTIO_BLK_T_OUT:
            return self._complete(memory, status_buffer, self._write(memory, sector, data_out))
        if kind == VIRTIO_BLK_T_FLUSH:
            ok = self.disk.flush()
            return self._complete(memory, status_buffer, VIRTIO_BLK_S_OK if ok else VIRTIO_BLK_S_IOERR)
        if kind == VIRTIO_BLK_T_GET_ID:
            if sum(b.length for b in data_in) < ID_BYTES:
                return self._complete(memory, status_buffer, VIRTIO_BLK_S_IOERR)
            _scatter(memory, data_in, f"snapvisor-{self.name}".encode()[:ID_BYTES].ljust(ID_BYTES, b"\0"))
            return ID_BYTES + self._complete(memory, status_buffer, VIRTIO_BLK_S_OK)
        return self._complete(memory, status_buffer, VIRTIO_BLK_S_UNSUPP)

    def _range_ok(self, sector: int, length: int) -> bool:
        return length % SECTOR_SIZE == 0 and sector * SECTOR_SIZE + length <= self.disk.size

    def _read(self, memory: GuestMemory, sector: int, buffers: list[Buffer]) -> int:
        length = sum(b.length for b in buffers)
        if not self._range_ok(sector, length):
            return VIRTIO_BLK_S_IOERR
        views = [memory.view(b.gpa, b.length) for b in buffers if b.length]
        ok = self.disk.read_into(sector * SECTOR_SIZE, views) if views else True
        for b in buffers:
            # Written by the VMM, not by a vCPU: KVM's dirty log does not see it.
            memory.mark_dirty(b.gpa, b.length)
        return VIRTIO_BLK_S_OK if ok else VIRTIO_BLK_S_IOERR

    def _write(self, memory: GuestMemory, sector: int, buffers: list[Buffer]) -> int:
        length = sum(b.length for b in buffers)
        if self.disk.readonly or not self._range_ok(sector, length):
            return VIRTIO_BLK_S_IOERR
        views = [memory.view(b.gpa, b.length) for b in buffers if b.length]
        ok = self.disk.write_from(sector * SECTOR_SIZE, views) if views else True
        return VIRTIO_BLK_S_OK if ok else VIRTIO_BLK_S_IOERR

    @staticmethod
    def _complete(memory: GuestMemory, status_buffer: Buffer, status: int) -> int:
        memory.write(status_buffer.gpa, bytes((status,)))
        return 1

    def close(self) -> None:
        self.disk.close()

    # --- persistence: the disk's contents are a snapshot region; here only what identifies it
    def save(self) -> dict:
        return {"version": STATE_VERSION, "name": self.name, "size": self.disk.size, "readonly": self.disk.readonly}

    def restore(self, state: dict) -> None:
        state = upgraded("virtio-blk", state, STATE_VERSION)
        if state["size"] != self.disk.size:
            raise ValueError(f"disk {self.name} was {state['size']} bytes, the attached image {self.disk.path} is {self.disk.size}")


def _gather(memory: GuestMemory, buffers: list[Buffer], length: int) -> bytes | None:
    """The first `length` bytes across `buffers`, or None if they hold fewer."""
    out = bytearray()
    for b in buffers:
        out += memory.read(b.gpa, min(b.length, length - len(out)))
        if len(out) == length:
            return bytes(out)
    return None


def _skip(buffers: list[Buffer], length: int) -> list[Buffer]:
    """`buffers` without their first `length` bytes."""
    out = []
    for b in buffers:
        if length >= b.length:
            length -= b.length
            continue
        out.append(Buffer(b.gpa + length, b.length - length, b.writable))
        length = 0
    return out


def _truncate(buffers: list[Buffer], length: int) -> list[Buffer]:
    """The first `length` bytes of `buffers`."""
    out = []
    for b in buffers:
        if length <= 0:
            break
        out.append(Buffer(b.gpa, min(b.length, length), b.writable))
        length -= b.length
    return out


def _split_tail(buffers: list[Buffer]) -> Buffer:
    """The last byte of the last non-empty buffer: where the status goes."""
    last = next(b for b in reversed(buffers) if b.length)
    return Buffer(last.gpa + last.length - 1, 1, True)


def _scatter(memory: GuestMemory, buffers: list[Buffer], data: bytes) -> None:
    offset = 0
    for b in buffers:
        if offset == len(data):
            break
        piece = data[offset : offset + b.length]
        memory.write(b.gpa, piece)
        offset += len(piece)
