"""virtio-net over virtio-mmio, driven register by register from the guest's
side in real guest memory, on a real tap: frames both ways, what the guest may
not send, frames too large for the guest's buffers, and the snapshot pause (no
frame half-written into guest memory)."""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading

import numpy as np
import pytest

from net_driver import HDR, MAC, STATUS_ALL_OK, NetRig, close_net_rig, make_net_rig
from netlab import GUEST_ADDRESS, HOST_ADDRESS, inside, ip
from snapvisor.vmm.devices.tap import TUN_OFFLOADS
from snapvisor.vmm.devices.virtio.mmio import STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1, Reg
from snapvisor.vmm.devices.virtio.net import (
    MAX_PACKET,
    OFFLOAD_FEATURES,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC,
)

pytestmark = pytest.mark.kvm
RX_BUFFERS = 0x100000


@pytest.fixture
def rig(tap_hosts):
    r = make_net_rig(tap_hosts("rig"))
    yield r
    close_net_rig(r)


def started(rig: NetRig, features: int = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC) -> NetRig:
    assert rig.setup(features) == STATUS_ALL_OK
    rig.device.start_io(rig.transport.serve_queue)
    return rig


def test_identifies_as_a_network_device_with_its_mac(rig: NetRig) -> None:
    assert rig.reg(Reg.DEVICE_ID) == 1
    assert bytes(rig.transport.read(Reg.CONFIG + i, 1) for i in range(6)) == MAC
    assert rig.transport.read(Reg.CONFIG + 6, 2) == 1  # link up
    assert rig.device.tap.offloads == TUN_OFFLOADS  # a Linux tap takes them all
    assert rig.device.features & OFFLOAD_FEATURES == OFFLOAD_FEATURES


def test_frames_go_both_ways(rig: NetRig) -> None:
    started(rig)
    # Transmit: exactly the frame, without the vnet header, reaches the tap.
    frame = MAC + bytes.fromhex("02aabbccdd02") + struct.pack("!H", 0x88B5) + os.urandom(100)
    assert rig.transmit(bytes(HDR) + frame)[1] == 0
    assert rig.sniffed() == [frame]
    # Receive: frames land in the posted buffers, header first (num_buffers 1), and interrupt.
    rig.post_rx([(RX_BUFFERS + i * 4096, 2048) for i in range(4)])
    sent = [rig.inject(os.urandom(n)) for n in (46, 500, 1486)]
    rig.wait_for(lambda: rig.used_idx(rig.rx) == 3)
    for (head, length), frame in zip(rig.take_used(rig.rx), sent):
        assert length == HDR + len(frame)
        data = rig.memory.read(RX_BUFFERS + head * 4096, length)
        assert data[10:12] == b"\1\0" and data[HDR:] == frame
    assert rig.interrupts and rig.device.stats.rx_frames == 3


def test_a_frame_waits_for_the_guest_to_post_buffers(rig: NetRig) -> None:
    started(rig)
    frame = rig.inject(b"waiting" * 10)
    rig.wait_for(lambda: rig.device._rx_length is not None)  # read from the tap, held
    rig.post_rx([(RX_BUFFERS, 2048)])
    rig.wait_for(lambda: rig.used_idx(rig.rx) == 1)
    assert rig.memory.read(RX_BUFFERS + HDR, len(frame)) == frame


def test_a_frame_larger_than_the_buffer_is_dropped_and_counted(rig: NetRig) -> None:
    started(rig)
    rig.post_rx([(RX_BUFFERS, 100)])
    rig.memory.write(RX_BUFFERS, b"\xee" * 4096)
    rig.inject(os.urandom(500))
    small = rig.inject(os.urandom(50))
    # The big one is dropped; the same chain takes the next frame that fits.
    rig.wait_for(lambda: rig.used_idx(rig.rx) == 1)
    assert rig.device.stats.rx_dropped_oversize == 1
    assert rig.take_used(rig.rx)[0][1] == HDR + len(small)
    assert rig.memory.read(RX_BUFFERS + HDR, len(small)) == small
    assert rig.memory.read(RX_BUFFERS + HDR + len(small), 4096 - HDR - len(small)) == b"\xee" * (4096 - HDR - len(small))


FRAME = MAC + bytes.fromhex("02aabbccdd02") + struct.pack("!H", 0x88B5) + bytes(46)


@pytest.mark.parametrize(
    "packet,features",
    [
        (bytes([1]) + bytes(HDR - 1) + FRAME, 0),  # checksum offload without VIRTIO_NET_F_CSUM
        (bytes([1, 1]) + bytes(HDR - 2) + FRAME, VIRTIO_NET_F_CSUM),  # TSO without HOST_TSO4
        (bytes([1, 3]) + bytes(HDR - 2) + FRAME, VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4),  # UDP GSO: never offered
        (bytes([1, 0x81]) + bytes(HDR - 2) + FRAME, VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4),  # ECN: never offered
        (bytes([0, 1]) + bytes(HDR - 2) + FRAME, VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4),  # TSO without NEEDS_CSUM
        (bytes([0x80]) + bytes(HDR - 1) + FRAME, VIRTIO_NET_F_CSUM),  # an unknown header flag
        (bytes(HDR) + FRAME[:13], 0),  # shorter than an Ethernet header
        (bytes(HDR) + FRAME + bytes(MAX_PACKET - HDR - len(FRAME) + 1), 0),  # over 64 KiB
    ],
    ids=["csum-not-negotiated", "tso-not-negotiated", "udp-gso", "ecn", "tso-no-csum", "unknown-flag", "runt",
         "oversize"],
)
def test_transmit_refuses_what_the_guest_may_not_send(rig: NetRig, packet: bytes, features: int) -> None:
    started(rig, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | features)
    _, written = rig.transmit(packet)
    assert written == 0 and rig.device.stats.tx_dropped == 1 and rig.device.stats.tx_frames == 0
    assert rig.sniffed(0.3) == []
    assert not rig.reg(Reg.STATUS) & STATUS_NEEDS_RESET  # the device goes on: the next frame is sent
    assert rig.transmit(bytes(HDR) + FRAME)[1] == 0 and rig.sniffed() == [FRAME]


def test_a_pause_never_shows_a_half_written_frame(rig: NetRig) -> None:
    """While frames pour in, every pause_io() leaves the receive ring in a state
    a snapshot may capture: each published entry holds its whole frame, and no
    buffer that is not published yet has been written at all."""
    started(rig)
    size = rig.rx.size
    canary = b"\xee" * 2048
    for i in range(size):
        rig.memory.write(RX_BUFFERS + i * 2048, canary)
    rig.post_rx([(RX_BUFFERS + i * 2048, 2048) for i in range(size)])
    frames: dict[bytes, bytes] = {}  # the first 8 payload bytes (a counter) -> frame
    stop = threading.Event()

    def pour() -> None:
        n = 0
        while not stop.is_set() and n < size - 1:
            payload = struct.pack("<Q", n) + os.urandom(1400)
            frames[payload[:8]] = rig.frame(payload)
            rig.inject(payload)
            n += 1
            stop.wait(0.001)  # a stream, not one burst: the pauses fall between and amid deliveries

    pourer = threading.Thread(target=pour)
    pourer.start()
    checked = 0
    # Switch threads often, so that a pause falls amid a delivery as often as it can.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        while rig.used_idx(rig.rx) < size - 1:
            rig.device.pause_io()
            try:
                published = rig.used_idx(rig.rx)
                view = np.frombuffer(rig.memory.read(RX_BUFFERS, size * 2048), dtype=np.uint8).reshape(size, 2048)
                used = [rig.used_elem(rig.rx, slot) for slot in range(published)]
                for head, length in used:
                    data = bytes(view[head, :length])
                    assert data[HDR:] == frames[data[HDR + 14 : HDR + 22]], f"entry {head} is not a whole frame"
                heads = {head for head, _ in used}
                untouched = [i for i in range(size) if i not in heads]
                assert (view[untouched] == 0xEE).all(), "a buffer was written before its entry was published"
                checked += 1
            finally:
                rig.device.resume_io()
    finally:
        sys.setswitchinterval(switch_interval)
        stop.set()
        pourer.join()
    assert checked > 10


def test_a_tap_deleted_under_the_vm_stops_receiving_without_harm(rig: NetRig) -> None:
    started(rig)
    rig.post_rx([(RX_BUFFERS, 2048)])
    ip("-n", rig.host.ns, "link", "del", rig.tap_name)
    rig.wait_for(lambda: rig.device.receive_error is not None)
    assert rig.device.receive_error.startswith(f"tap {rig.tap_name} failed:")
    # Sending fails quietly too: counted, the queue goes on, nothing is raised into the VMM.
    assert rig.transmit(bytes(HDR) + FRAME)[1] == 0
    assert rig.device.stats.tx_errors == 1 and not rig.reg(Reg.STATUS) & STATUS_NEEDS_RESET


@pytest.mark.parametrize("guest_csum", [False, True], ids=["no-offload", "guest-csum"])
def test_the_tap_offloads_only_what_the_guest_negotiated(rig: NetRig, guest_csum: bool) -> None:
    """A UDP datagram from the host's stack reaches the guest with its checksum
    left to the guest (NEEDS_CSUM) only when the guest took VIRTIO_NET_F_GUEST_CSUM."""
    features = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | (VIRTIO_NET_F_GUEST_CSUM if guest_csum else 0)
    started(rig, features)
    ip("-n", rig.host.ns, "addr", "add", f"{HOST_ADDRESS}/24", "dev", rig.tap_name)
    ip("-n", rig.host.ns, "neigh", "add", GUEST_ADDRESS, "lladdr", MAC.hex(":"), "dev", rig.tap_name)
    rig.post_rx([(RX_BUFFERS, 2048)])
    with inside(rig.host.ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(b"checksum me" * 20, (GUEST_ADDRESS, 9))
    rig.wait_for(lambda: rig.used_idx(rig.rx) == 1)
    header = rig.memory.read(RX_BUFFERS, HDR)
    assert bool(header[0] & 1) == guest_csum, header.hex()
