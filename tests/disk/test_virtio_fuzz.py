"""Fuzzing the virtio-blk device with random queues and descriptors in real
guest memory (seeded, so a failure replays). Whatever the guest puts there, the
device must not raise into the VMM, must write guest RAM only inside the used
ring and the buffers the guest marked device-writable, must report every page it
wrote to the memory dirty log and every block it wrote to the disk's, and must
either consume every offered chain or flag DEVICE_NEEDS_RESET."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest

from snapvisor.vmm.devices.virtio.mmio import Reg
from virtio_driver import AVAIL_GPA, DATA_GPA, DESC_GPA, NEEDS_RESET, QSIZE, STATUS_ALL_OK, USED_GPA, MiB, close_rig, make_rig
from testsupport import hostile_address

pytestmark = pytest.mark.kvm
RAM = 2 * MiB
DISK = 1 * MiB
ROUNDS = 300
PAGE = 4096


def _address(rng: random.Random) -> int:
    return hostile_address(rng, DATA_GPA, RAM)


def _length(rng: random.Random) -> int:
    return rng.choice([0, 1, 15, 16, 17, 512, 1024, 4096, rng.randrange(0, 1 << 16), (1 << 32) - 1])


def _flags(rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 3, 4, 5, 6, 7, rng.randrange(0, 1 << 16)])


def _request_chains(rig, rng: random.Random, size: int) -> list[int]:
    """Mostly sensible three-descriptor requests (header, data, status) with the
    odd field perturbed, so the request code is fuzzed and not only the walker;
    returns their heads."""
    heads = []
    for first in range(0, size - 2, 3):
        header = DATA_GPA + 0x10000 + 32 * first
        kind = rng.choice([0, 1, 4, 8, rng.randrange(0, 1 << 32)])
        sector = rng.choice([0, rng.randrange(0, DISK // 512), DISK // 512 - 1, DISK // 512, rng.randrange(0, 1 << 64)])
        rig.memory.write(header, struct.pack("<IIQ", kind, 0, sector))
        data = (DATA_GPA + rng.randrange(0, 16) * 4096, rng.choice([512, 1024, 4096, 8192]), 1 | (0 if kind == 1 else 2))
        status = (DATA_GPA + 0x20000 + first, 1, 2)
        entries = [(header, 16, 1), data, status]
        if rng.random() < 0.3:
            which = rng.randrange(3)
            addr, length, flags = entries[which]
            entries[which] = rng.choice([(_address(rng), length, flags), (addr, _length(rng), flags), (addr, length, _flags(rng))])
        for step, (addr, length, flags) in enumerate(entries):
            rig.put_desc(first + step, addr, length, flags, first + step + 1)
        heads.append(first)
    return heads


def _fill_queue(rig, rng: random.Random, size: int) -> int:
    """Random descriptors, request headers and available entries; returns how
    many chains were offered (-1: more than the queue holds)."""
    if size >= 3 and rng.random() < 0.6:
        heads = _request_chains(rig, rng, size)
    else:
        for index in range(size):
            rig.put_desc(index, _address(rng), _length(rng), _flags(rng), rng.randrange(0, size + 3))
        heads = [rng.randrange(0, size + 2) for _ in range(size)]
    next_avail = rig.transport.queues[0].next_avail
    for k in range(size):
        head = heads[k % len(heads)] if heads else 0
        rig.memory.write(AVAIL_GPA + 4 + 2 * ((next_avail + k) % size), struct.pack("<H", head))
    offered = rng.choice([0, 1, len(heads), len(heads), size, size + 1, rng.randrange(0, 1 << 16)])
    rig.memory.write(AVAIL_GPA + 2, struct.pack("<H", (next_avail + offered) & 0xFFFF))
    return offered if offered <= size else -1


def _allowed_writes(rig, size: int) -> np.ndarray:
    """Bytes of guest RAM the device may write: the used ring and every buffer a
    descriptor marks device-writable, as the table stood before the request."""
    allowed = np.zeros(RAM, dtype=bool)
    allowed[USED_GPA : USED_GPA + 6 + 8 * size] = True
    table = rig.memory.read(DESC_GPA, 16 * size)
    for index in range(size):
        addr, length, flags, _ = struct.unpack_from("<QIHH", table, 16 * index)
        if flags & 2 and addr < RAM:
            allowed[addr : min(addr + length, RAM)] = True
    return allowed


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_queues_never_escape_the_rules(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    rig = make_rig(tmp_path, disk_size=DISK, mem_size=RAM)
    ram = np.frombuffer(rig.memory.regions[0].view, dtype=np.uint8)
    outcomes = {"consumed": 0, "needs_reset": 0}
    try:
        for _ in range(ROUNDS):
            size = rng.choice([1, 2, 4, 8, QSIZE])
            assert rig.setup(qsize=size, interrupts=rng.random() < 0.5) == STATUS_ALL_OK
            offered = _fill_queue(rig, rng, size)
            allowed = _allowed_writes(rig, size)
            before = ram.copy()
            disk_before = Path(rig.disk.path).read_bytes()
            rig.memory.fetch_dirty(rig.memory.regions[0])
            rig.disk.fetch_dirty()
            used_before = rig.used_idx()

            rig.notify()  # must not raise, whatever the queue holds

            changed = np.flatnonzero(ram != before)
            outside = changed[~allowed[changed]]
            assert not len(outside), f"seed {seed}: device wrote guest RAM outside writable buffers at {outside[:8]}"
            dirty_pages = rig.memory.fetch_dirty(rig.memory.regions[0])
            assert dirty_pages[np.unique(changed // PAGE)].all(), "a page the device wrote is missing from the dirty log"
            disk_after = Path(rig.disk.path).read_bytes()
            assert len(disk_after) == DISK
            changed_blocks = np.flatnonzero(
                (np.frombuffer(disk_after, np.uint8) != np.frombuffer(disk_before, np.uint8)).reshape(-1, PAGE).any(axis=1)
            )
            assert rig.disk.fetch_dirty()[changed_blocks].all(), "a block the device wrote is missing from its dirty record"
            if rig.reg(Reg.STATUS) & NEEDS_RESET:
                outcomes["needs_reset"] += 1
            else:
                assert offered >= 0, "an available index more than a queue ahead was accepted"
                assert (rig.used_idx() - used_before) & 0xFFFF == offered
                outcomes["consumed"] += 1
        # both outcomes were exercised, and the device still works afterwards
        assert outcomes["consumed"] > 10 and outcomes["needs_reset"] > 10, outcomes
        assert rig.transport.device.requests > ROUNDS // 5  # chains got as far as the request code
        assert rig.setup() == STATUS_ALL_OK
        assert rig.request(1, 0, 512, b"q" * 512)[0] == 0
        assert rig.request(0, 0, 512)[2] == b"q" * 512
    finally:
        close_rig(rig)
