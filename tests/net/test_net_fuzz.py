"""Fuzzing the virtio-net queues with random descriptors in real guest memory
while real frames arrive from the tap (seeded, so a failure replays). Whatever
the guest puts there, the device must not raise into the VMM, must write guest
RAM only inside the used rings and the receive buffers the guest marked
device-writable, must report every page it wrote to the dirty log, and must
either consume every offered transmit chain or flag DEVICE_NEEDS_RESET."""

from __future__ import annotations

import os
import random
import struct
import time

import numpy as np
import pytest

from net_driver import HDR, RAM, MAC, NetRig, Ring, STATUS_ALL_OK, close_net_rig, make_net_rig
from snapvisor.vmm.devices.virtio.mmio import STATUS_NEEDS_RESET, Reg
from testsupport import hostile_address

pytestmark = pytest.mark.kvm
ROUNDS = 60
PAGE = 4096
DATA = 0x100000
FRAME = MAC + bytes.fromhex("02aabbccdd02") + struct.pack("!H", 0x88B5) + bytes(46)


def _address(rng: random.Random) -> int:
    return hostile_address(rng, DATA, RAM)


def _length(rng: random.Random) -> int:
    return rng.choice([0, 1, HDR, 60, 1514, 2048, rng.randrange(0, 1 << 17), (1 << 32) - 1])


def _flags(rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 3, 4, 5, 6, 7, rng.randrange(0, 1 << 16)])


def _fill(rig: NetRig, ring: Ring, rng: random.Random, writable: bool) -> int:
    """Random descriptors (or, often, sensible ones with a field perturbed) and
    available entries; returns how many chains were offered (-1: more than the ring holds)."""
    size = ring.size
    perturb = rng.choice([0.0, 0.02, 0.3])  # how many descriptors get a random field
    for index in range(size):
        addr, length, flags = DATA + index * 2048, 2048, 2 if writable else 0
        if not writable:
            rig.memory.write(addr, rng.choice([bytes(HDR), bytes([1, rng.randrange(256)]) + bytes(HDR - 2)]) + FRAME)
            length = HDR + len(FRAME)
        if rng.random() < perturb:
            which = rng.randrange(3)
            addr, length, flags = [(_address(rng), length, flags), (addr, _length(rng), flags),
                                   (addr, length, _flags(rng))][which]
        rig.put_desc(ring, index, addr, length, flags, rng.randrange(0, size + 2))
    next_avail = rig.transport.queues[ring.index].next_avail
    for k in range(size):
        head = rng.randrange(0, size + 1) if rng.random() < perturb else k
        rig.memory.write(ring.avail + 4 + 2 * ((next_avail + k) % size), struct.pack("<H", head))
    offered = rng.choice([0, 1, size, size, size + 1, rng.randrange(0, 1 << 16)])
    rig.memory.write(ring.avail + 2, struct.pack("<H", (next_avail + offered) & 0xFFFF))
    ring.avail_idx = (next_avail + offered) & 0xFFFF
    return offered if offered <= size else -1


def _allowed_writes(rig: NetRig) -> np.ndarray:
    """The used rings, and every receive buffer a descriptor marks device-writable."""
    allowed = np.zeros(RAM, dtype=bool)
    for ring in (rig.rx, rig.tx):
        allowed[ring.used : ring.used + 6 + 8 * ring.size] = True
    table = rig.memory.read(rig.rx.desc, 16 * rig.rx.size)
    for index in range(rig.rx.size):
        addr, length, flags, _ = struct.unpack_from("<QIHH", table, 16 * index)
        if flags & 2 and addr < RAM:
            allowed[addr : min(addr + length, RAM)] = True
    return allowed


@pytest.mark.parametrize("seed", [1, 2])
def test_random_queues_never_escape_the_rules(tap_hosts, seed: int) -> None:
    rng = random.Random(seed)
    rig = make_net_rig(tap_hosts("fuzz"))
    ram = np.frombuffer(rig.memory.regions[0].view, dtype=np.uint8)
    outcomes = {"consumed": 0, "needs_reset": 0}
    rig.device.start_io(rig.transport.serve_queue)
    try:
        for _ in range(ROUNDS):
            rig.device.pause_io()  # the rings are set up as a stopped guest would
            rig.rx.size, rig.tx.size = rng.choice([1, 2, 4, 16, 64]), rng.choice([1, 2, 4, 16])
            assert rig.setup() == STATUS_ALL_OK
            _fill(rig, rig.rx, rng, writable=True)
            offered = _fill(rig, rig.tx, rng, writable=False)
            allowed = _allowed_writes(rig)
            before = ram.copy()
            rig.memory.fetch_dirty(rig.memory.regions[0])
            rig.device.resume_io()
            for _ in range(rng.randrange(0, 8)):
                rig.inject(os.urandom(rng.choice([46, 500, 1500, 4000])))

            rig.notify(rig.rx)
            rig.notify(rig.tx)  # must not raise, whatever the queue holds
            time.sleep(0.05)  # frames arrive meanwhile: no event says "all placed" when chains run out
            rig.device.pause_io()

            changed = np.flatnonzero(ram != before)
            outside = changed[~allowed[changed]]
            assert not len(outside), f"seed {seed}: device wrote guest RAM outside writable buffers at {outside[:8]}"
            dirty_pages = rig.memory.fetch_dirty(rig.memory.regions[0])
            assert dirty_pages[np.unique(changed // PAGE)].all(), "a page the device wrote is missing from the dirty log"
            if rig.reg(Reg.STATUS) & STATUS_NEEDS_RESET:
                outcomes["needs_reset"] += 1
            else:
                assert offered >= 0, "an available index more than a queue ahead was accepted"
                assert rig.used_idx(rig.tx) == offered
                outcomes["consumed"] += 1
            rig.device.resume_io()
        assert outcomes["consumed"] > 5 and outcomes["needs_reset"] > 5, outcomes
        assert rig.device.stats.tx_frames and rig.device.stats.tx_dropped and rig.device.stats.rx_frames
        # The device still works afterwards.
        rig.rx.size, rig.tx.size = 16, 16
        assert rig.setup() == STATUS_ALL_OK
        rig.sniffed(0.2)  # what the rounds sent
        assert rig.transmit(bytes(HDR) + FRAME)[1] == 0 and rig.sniffed() == [FRAME]
    finally:
        close_net_rig(rig)
