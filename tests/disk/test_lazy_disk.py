"""Lazy disks, bookkeeping level: a BlockFile over an empty sparse image filled
from a real snapshot region by LazyDisks, driven with reads and writes as the
virtio-blk device issues them (byte offsets, whole or partial 4 KiB blocks),
and once through the device itself. The VM-level tests are in
test_lazy_disk_restore.py."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from snapvisor.image.disks import create_image, write_sparse_image
from snapvisor.image.lazydisk import GROUP_BLOCKS, LazyDisks
from snapvisor.store import PAGE_SIZE, RegionReader, Repository
from snapvisor.store.errors import RepositoryError
from snapvisor.store.memory import MemoryStore
from snapvisor.vmm.devices.blockfile import BlockFile, FillError
from snapvisor.vmm.extents import populated_pages
from virtio_driver import DATA_GPA, STATUS_ALL_OK, close_rig, make_rig

B = PAGE_SIZE
IN, OUT, OK, IOERR = 0, 1, 0, 1  # virtio-blk request types and statuses
BLOCKS = 8 * GROUP_BLOCKS + 10  # eight groups and a short last one


@pytest.fixture(scope="module")
def snapshot_disk() -> tuple[RegionReader, np.ndarray]:
    """A snapshot region of random blocks, with an all-zero group (2) and zero
    blocks among the data; its reader and its blocks."""
    data = np.random.default_rng(7).integers(0, 256, (BLOCKS, B), dtype=np.uint8)
    data[2 * GROUP_BLOCKS : 3 * GROUP_BLOCKS] = 0
    data[[5, 70, 71, BLOCKS - 1]] = 0
    repo = Repository.init(MemoryStore())
    with repo.start_snapshot() as writer:
        writer.put_region("disk-vda", BLOCKS * B, data)
        info = writer.commit(vm="unit")
    return repo.get_snapshot(info.id).region_reader("disk-vda"), data


class _Lazy:
    """An empty image attached as a BlockFile, with LazyDisks filling it from `reader`."""

    def __init__(self, tmp_path: Path, reader) -> None:
        self.path = tmp_path / "vda.img"
        os.close(create_image(self.path, BLOCKS * B))
        self.disk = BlockFile(self.path)
        self.errors: list[BaseException] = []
        self.lazy = LazyDisks({"vda": (self.disk, reader)}, on_error=self.errors.append)

    def read(self, offset: int, length: int) -> bytes | None:
        out = bytearray(length)
        return bytes(out) if self.disk.read_into(offset, [memoryview(out)]) else None

    def write(self, offset: int, data: bytes) -> bool:
        return self.disk.write_from(offset, [memoryview(data)])

    def blocks(self) -> np.ndarray:
        return np.fromfile(self.path, dtype=np.uint8).reshape(-1, B)

    def close(self) -> None:
        self.lazy.close()
        self.disk.close()


@pytest.fixture
def lazy(tmp_path: Path, snapshot_disk):
    rig = _Lazy(tmp_path, snapshot_disk[0])
    yield rig
    rig.close()


def test_a_read_brings_in_the_groups_it_touches_once(lazy: _Lazy, snapshot_disk) -> None:
    _, data = snapshot_disk
    # Blocks 60..70: the end of group 0 and the start of group 1, both fetched whole.
    assert lazy.read(60 * B + 512, 10 * B) == data[60:71].tobytes()[512 : 512 + 10 * B]
    assert lazy.lazy.blocks_on_demand == 2 * GROUP_BLOCKS
    assert lazy.read(0, B) == data[0].tobytes()  # in already: no fetch
    assert lazy.read(2 * GROUP_BLOCKS * B, GROUP_BLOCKS * B) == bytes(GROUP_BLOCKS * B)  # no data: the hole
    assert lazy.lazy.blocks_on_demand == 2 * GROUP_BLOCKS
    assert (lazy.blocks()[: 2 * GROUP_BLOCKS] == data[: 2 * GROUP_BLOCKS]).all()
    assert lazy.lazy.blocks_in_background == 0 and not lazy.errors


def test_writes_whole_blocks_without_a_fetch_and_partial_ones_over_the_old_data(lazy: _Lazy, snapshot_disk) -> None:
    _, data = snapshot_disk
    expected = data.copy()
    # A partial write of one block (group 4): the block is read first.
    assert lazy.write(300 * B + 512, b"\xaa" * 1024)
    expected[300, 512:1536] = 0xAA
    assert lazy.lazy.blocks_on_demand == GROUP_BLOCKS
    # Whole blocks of an unfilled group (6): nothing fetched.
    assert lazy.write(400 * B, b"\xbb" * 2 * B)
    expected[400:402] = 0xBB
    assert lazy.lazy.blocks_on_demand == GROUP_BLOCKS
    # Partial, whole, whole, partial, across groups 6 and 7: only the two edge groups are read.
    assert lazy.write(446 * B + 2048, b"\xcc" * 3 * B)
    expected.reshape(-1)[446 * B + 2048 : 449 * B + 2048] = 0xCC
    assert lazy.lazy.blocks_on_demand == GROUP_BLOCKS + (GROUP_BLOCKS - 2) + GROUP_BLOCKS
    # A partial write into a group without data: the hole is the old data, no fetch.
    assert lazy.write(2 * GROUP_BLOCKS * B + 512, b"\xdd" * 512)
    expected[2 * GROUP_BLOCKS, 512:1024] = 0xDD
    assert lazy.lazy.blocks_on_demand == 3 * GROUP_BLOCKS - 2
    lazy.lazy.start()
    assert lazy.lazy.wait(30) and lazy.lazy.error is None
    assert lazy.disk.filler is None  # complete: the I/O path checks one attribute
    assert (lazy.blocks() == expected).all()
    assert lazy.read(300 * B, B) == expected[300].tobytes()


def test_the_fill_equals_an_eager_restore_and_leaves_zero_blocks_as_holes(lazy: _Lazy, snapshot_disk, tmp_path: Path) -> None:
    reader, data = snapshot_disk
    lazy.lazy.start()
    assert lazy.lazy.wait(30) and lazy.lazy.error is None
    eager = tmp_path / "eager.img"
    write_sparse_image(reader, eager)
    assert lazy.path.read_bytes() == eager.read_bytes() == data.tobytes()
    with open(lazy.path, "rb") as lazy_file, open(eager, "rb") as eager_file:
        filled = populated_pages(lazy_file.fileno(), BLOCKS * B)
        assert (filled == populated_pages(eager_file.fileno(), BLOCKS * B)).all()
    assert (filled == data.any(axis=1)).all()
    assert lazy.lazy.blocks_in_background == int((np.repeat(reader.data_blocks(GROUP_BLOCKS), GROUP_BLOCKS)[:BLOCKS]).sum())


class _GatedReader:
    """The region's reader, except that the background fill's reads wait for `gate`
    (after setting `entered`): guest I/O can be put between its read and its write."""

    def __init__(self, reader: RegionReader) -> None:
        self._reader = reader
        self.entered, self.gate = threading.Event(), threading.Event()

    def data_blocks(self, block_pages: int) -> np.ndarray:
        return self._reader.data_blocks(block_pages)

    def read_pages_into(self, pages, out) -> None:
        self._reader.read_pages_into(pages, out)
        if threading.current_thread().name == "lazy-disks":
            self.entered.set()
            assert self.gate.wait(30)


def test_the_fill_never_overwrites_blocks_the_guest_wrote_or_read_meanwhile(tmp_path: Path, snapshot_disk) -> None:
    reader, data = snapshot_disk
    gated = _GatedReader(reader)
    rig = _Lazy(tmp_path, gated)
    try:
        rig.lazy.start()
        assert gated.entered.wait(30)  # the fill holds the old blocks of its first batch, not written yet
        expected = data.copy()
        assert rig.write(10 * B, b"\x11" * B)  # whole block
        assert rig.write(20 * B + 1024, b"\x22" * 512)  # part of a block: read first, here, not gated
        expected[10] = 0x11
        expected[20, 1024:1536] = 0x22
        assert rig.read(GROUP_BLOCKS * B, B) == data[GROUP_BLOCKS].tobytes()
        gated.gate.set()
        assert rig.lazy.wait(30) and rig.lazy.error is None
        assert (rig.blocks() == expected).all()
        assert rig.lazy.blocks_on_demand == 2 * GROUP_BLOCKS - 1  # groups 0 (less block 10) and 1
    finally:
        gated.gate.set()
        rig.close()


class _Unreachable:
    """A region reader whose repository has gone away."""

    def __init__(self, reader: RegionReader) -> None:
        self._reader = reader

    def data_blocks(self, block_pages: int) -> np.ndarray:
        return self._reader.data_blocks(block_pages)

    def read_pages_into(self, pages, out) -> None:
        raise RepositoryError("pack data/ab/abcd is missing from file:///srv/repo; run `snapvisor verify`")


def test_a_failed_fetch_fails_the_request_reports_once_and_serves_nothing(tmp_path: Path, snapshot_disk) -> None:
    reader, data = snapshot_disk
    rig = _Lazy(tmp_path, _Unreachable(reader))
    try:
        assert rig.read(0, B) is None  # an I/O error for the guest, not zeros
        assert rig.write(GROUP_BLOCKS * B + 512, b"x" * 512) is False  # a partial write needs the old block
        assert rig.read(2 * GROUP_BLOCKS * B, B) == bytes(B)  # a group without data needs no fetch
        assert len(rig.errors) == 1
        message = str(rig.errors[0])
        assert "disk vda, blocks 0..63" in message and "is missing" in message and "snapvisor verify" in message
        assert rig.read(0, B) is None and len(rig.errors) == 1
        rig.lazy.start()
        assert rig.lazy.wait(30) and rig.lazy.error is rig.errors[0]
        with pytest.raises(FillError, match="disk vda of a lazy restore is not complete"):
            rig.disk.data_blocks()  # what a full snapshot reads first
        assert not rig.blocks()[: 2 * GROUP_BLOCKS].any()  # nothing was written
    finally:
        rig.close()


@pytest.mark.kvm
def test_the_guest_gets_an_io_error_status_when_blocks_cannot_be_fetched(tmp_path: Path, snapshot_disk) -> None:
    reader, _ = snapshot_disk
    rig = make_rig(tmp_path, disk_size=BLOCKS * B)
    lazy = LazyDisks({"vda": (rig.disk, _Unreachable(reader))}, on_error=lambda exc: None)
    try:
        assert rig.setup() == STATUS_ALL_OK
        rig.memory.write(DATA_GPA, b"\xee" * B)
        assert rig.request(IN, 0, B)[:2] == (IOERR, 1)  # only the status byte was written
        assert rig.memory.read(DATA_GPA, B) == b"\xee" * B
        assert rig.request(OUT, 1, 512, b"x" * 512)[0] == IOERR  # part of a block it cannot read first
        assert rig.request(IN, 2 * GROUP_BLOCKS * 8, B)[0] == OK  # a group without data needs nothing
    finally:
        lazy.close()
        close_rig(rig)
