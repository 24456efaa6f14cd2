"""virtio-blk over virtio-mmio, driven register by register from the guest's
side in real guest memory: requests, errors the guest can cause, interrupts,
dirty tracking of disk blocks and of guest pages the device writes, and the
device state across save/restore."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from snapvisor.vmm.devices.blockfile import BlockFile, DiskError
from snapvisor.vmm.devices.virtio.mmio import MAGIC, Reg, VIRTIO_F_VERSION_1
from virtio_driver import (
    AVAIL_GPA,
    DATA_GPA,
    DESC_GPA,
    HEADER_GPA,
    NEEDS_RESET,
    QSIZE,
    STATUS_ALL_OK,
    STATUS_GPA,
    USED_GPA,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    MiB,
    close_rig,
    make_rig,
)

pytestmark = pytest.mark.kvm
IN, OUT, FLUSH, GET_ID, UNKNOWN = 0, 1, 4, 8, 0x99
OK, IOERR, UNSUPP = 0, 1, 2


@pytest.fixture
def rig(tmp_path: Path):
    r = make_rig(tmp_path)
    assert r.setup() == STATUS_ALL_OK
    yield r
    close_rig(r)


def test_identifies_as_a_version_2_block_device(rig) -> None:
    assert (rig.reg(Reg.MAGIC_VALUE), rig.reg(Reg.VERSION), rig.reg(Reg.DEVICE_ID)) == (MAGIC, 2, 2)
    # capacity in 512-byte sectors, from the config space
    assert rig.transport.read(Reg.CONFIG, 8) == MiB // 512
    assert rig.reg(Reg.QUEUE_NUM_MAX) >= QSIZE


def test_write_then_read_back(rig) -> None:
    data = os.urandom(8192)
    assert rig.request(OUT, 16, 8192, data)[:2] == (OK, 1)
    assert Path(rig.disk.path).read_bytes()[16 * 512 : 16 * 512 + 8192] == data
    rig.memory.write(DATA_GPA, bytes(8192))
    status, written, read = rig.request(IN, 16, 8192)
    assert (status, written, read) == (OK, 8192 + 1, data)


def test_get_id_and_flush(rig) -> None:
    status, written, ident = rig.request(GET_ID, 0, 20)
    assert (status, written) == (OK, 21) and ident.rstrip(b"\0") == b"snapvisor-vda"
    assert rig.request(FLUSH, 0, 0)[0] == OK


@pytest.mark.parametrize(
    "kind,sector,length,expected",
    [
        (IN, MiB // 512 - 1, 1024, IOERR),  # runs past the end of the disk
        (OUT, MiB // 512, 512, IOERR),  # starts at the end
        (OUT, 2**63, 512, IOERR),  # absurd sector
        (IN, 0, 100, IOERR),  # not a whole number of sectors
        (UNKNOWN, 0, 512, UNSUPP),
    ],
)
def test_bad_requests_complete_with_an_error_status(rig, kind, sector, length, expected) -> None:
    before = Path(rig.disk.path).read_bytes()
    assert rig.request(kind, sector, length, b"\xab" * length if kind == OUT else b"")[0] == expected
    assert Path(rig.disk.path).read_bytes() == before
    assert rig.reg(Reg.STATUS) == STATUS_ALL_OK  # the device goes on serving
    assert rig.request(IN, 0, 512)[0] == OK


def test_read_only_disk_refuses_writes(tmp_path: Path) -> None:
    r = make_rig(tmp_path, readonly=True)
    try:
        r.setup(features=VIRTIO_F_VERSION_1 | 1 << 5)  # VIRTIO_BLK_F_RO is offered, so it may be accepted
        assert r.reg(Reg.STATUS) == STATUS_ALL_OK
        assert r.request(OUT, 0, 512, b"x" * 512)[0] == IOERR
        assert Path(r.disk.path).read_bytes() == bytes(MiB)
        assert r.request(IN, 0, 512)[0] == OK
    finally:
        close_rig(r)


def test_features_the_device_did_not_offer_are_refused(tmp_path: Path) -> None:
    r = make_rig(tmp_path)
    try:
        assert not r.setup(features=VIRTIO_F_VERSION_1 | 1 << 28) & 8  # indirect descriptors: not offered
        assert not r.setup(features=0) & 8  # legacy (no VERSION_1) drivers are not served
    finally:
        close_rig(r)


def test_queue_is_not_served_without_feature_negotiation(tmp_path: Path) -> None:
    r = make_rig(tmp_path)
    try:
        r.set_reg(Reg.STATUS, 1 | 2)  # no features negotiated: a legacy driver
        r.set_reg(Reg.QUEUE_NUM, QSIZE)
        for low, gpa in ((Reg.QUEUE_DESC_LOW, DESC_GPA), (Reg.QUEUE_DRIVER_LOW, AVAIL_GPA), (Reg.QUEUE_DEVICE_LOW, USED_GPA)):
            r.set_reg(low, gpa)
        r.set_reg(Reg.QUEUE_READY, 1)
        r.set_reg(Reg.STATUS, 1 | 2 | 4)
        assert r.reg(Reg.QUEUE_READY) == 1
        r.memory.write(HEADER_GPA, struct.pack("<IIQ", IN, 0, 0))
        r.put_desc(0, HEADER_GPA, 16, VIRTQ_DESC_F_NEXT, 1)
        r.put_desc(1, STATUS_GPA, 1, VIRTQ_DESC_F_WRITE)
        r.avail_idx = 0
        r.offer(0)
        r.notify()
        assert r.used_idx() == 0
    finally:
        close_rig(r)


def _assert_needs_reset_and_recovers(rig) -> None:
    assert rig.reg(Reg.STATUS) & NEEDS_RESET
    assert rig.reg(Reg.INTERRUPT_STATUS) & 2  # configuration change, as the spec asks
    rig.notify()  # a broken device ignores further notifications
    assert rig.setup() == STATUS_ALL_OK  # a reset brings it back
    assert rig.request(IN, 0, 512)[0] == OK


def test_descriptor_loop_needs_reset(rig) -> None:
    rig.put_desc(0, HEADER_GPA, 16, VIRTQ_DESC_F_NEXT, 1)
    rig.put_desc(1, DATA_GPA, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0)
    rig.offer(0)
    rig.notify()
    _assert_needs_reset_and_recovers(rig)


@pytest.mark.parametrize("gpa,length", [(2 * MiB - 8, 16), (0xD000_0000, 512), (2**64 - 512, 512), (0, 2**32 - 1)])
def test_buffer_outside_guest_ram_needs_reset(rig, gpa, length) -> None:
    rig.memory.write(HEADER_GPA, struct.pack("<IIQ", IN, 0, 0))
    rig.put_desc(0, HEADER_GPA, 16, VIRTQ_DESC_F_NEXT, 1)
    rig.put_desc(1, gpa, length, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2)
    rig.put_desc(2, STATUS_GPA, 1, VIRTQ_DESC_F_WRITE)
    rig.offer(0)
    rig.notify()
    _assert_needs_reset_and_recovers(rig)


def test_next_index_outside_the_queue_needs_reset(rig) -> None:
    rig.put_desc(0, HEADER_GPA, 16, VIRTQ_DESC_F_NEXT, QSIZE + 3)
    rig.offer(0)
    rig.notify()
    _assert_needs_reset_and_recovers(rig)


def test_available_index_far_ahead_needs_reset(rig) -> None:
    rig.memory.write(AVAIL_GPA + 2, struct.pack("<H", QSIZE + 1))
    rig.notify()
    _assert_needs_reset_and_recovers(rig)


def test_queue_outside_guest_ram_is_not_made_ready(tmp_path: Path) -> None:
    r = make_rig(tmp_path)
    try:
        r.set_reg(Reg.STATUS, 1 | 2)
        r.set_reg(Reg.DRIVER_FEATURES_SEL, 1)
        r.set_reg(Reg.DRIVER_FEATURES, 1)
        r.set_reg(Reg.STATUS, 1 | 2 | 8)
        r.set_reg(Reg.QUEUE_NUM, QSIZE)
        r.set_reg(Reg.QUEUE_DESC_LOW, 0xFFFF0000)
        r.set_reg(Reg.QUEUE_READY, 1)
        assert r.reg(Reg.QUEUE_READY) == 0 and r.reg(Reg.STATUS) & NEEDS_RESET
    finally:
        close_rig(r)


def test_interrupt_unless_the_driver_suppresses_it(rig) -> None:
    rig.request(IN, 0, 512)
    assert rig.interrupts and rig.reg(Reg.INTERRUPT_STATUS) == 1
    rig.set_reg(Reg.INTERRUPT_ACK, 1)
    assert rig.reg(Reg.INTERRUPT_STATUS) == 0
    rig.interrupts.clear()
    rig.memory.write(AVAIL_GPA, struct.pack("<H", 1))  # VIRTQ_AVAIL_F_NO_INTERRUPT
    rig.request(IN, 0, 512)
    assert not rig.interrupts and rig.reg(Reg.INTERRUPT_STATUS) == 0


def test_written_blocks_are_tracked_until_fetched(rig) -> None:
    rig.request(OUT, 8 * 5, 4096, b"a" * 4096)  # block 5
    rig.request(OUT, 8 * 9 + 7, 1024, b"b" * 1024)  # straddles blocks 9 and 10
    rig.request(IN, 8 * 20, 4096)  # reads dirty nothing
    assert np.flatnonzero(rig.disk.fetch_dirty()).tolist() == [5, 9, 10]
    assert not rig.disk.fetch_dirty().any()


def test_pages_the_device_writes_reach_the_memory_dirty_log(rig) -> None:
    for region in rig.memory.regions:
        rig.memory.fetch_dirty(region)
    rig.request(IN, 0, 8192)
    dirty = np.flatnonzero(rig.memory.fetch_dirty(rig.memory.regions[0])).tolist()
    # the data pages, the status byte's page and the used ring's page: writes by the VMM, not by a vCPU
    for gpa in (DATA_GPA, DATA_GPA + 4096, STATUS_GPA, DESC_GPA + 0x2000):
        assert gpa // 4096 in dirty, (hex(gpa), dirty)


def test_state_saved_mid_stream_continues_in_a_new_device(tmp_path: Path, rig) -> None:
    rig.request(OUT, 0, 512, b"z" * 512)
    rig.request(IN, 0, 512)
    saved = rig.transport.save()
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    second = make_rig(other_dir)
    try:
        second.memory.write(0, rig.memory.read(0, 2 * MiB))  # the guest's memory moves with it
        second.transport.restore(saved)
        second.avail_idx = rig.avail_idx
        assert second.reg(Reg.STATUS) == STATUS_ALL_OK and second.reg(Reg.QUEUE_READY) == 1
        second.request(OUT, 8, 512, b"y" * 512)
        assert second.used_idx() == 3  # the used index goes on from the saved one
        assert Path(second.disk.path).read_bytes()[4096:4608] == b"y" * 512
    finally:
        close_rig(second)


def test_attach_errors_are_clear(tmp_path: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(DiskError, match="multiple of 4096"):
        BlockFile(odd)
    with pytest.raises(DiskError, match="cannot open disk image"):
        BlockFile(tmp_path / "missing.img")
    image = tmp_path / "shared.img"
    with image.open("wb") as file:
        file.truncate(MiB)
    first = BlockFile(image)
    try:
        with pytest.raises(DiskError, match="in use by another VM"):
            BlockFile(image)
    finally:
        first.close()
    BlockFile(image).close()  # the lock went with the first one
