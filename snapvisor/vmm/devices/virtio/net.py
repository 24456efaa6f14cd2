"""virtio-net (device id 1) on a host tap: one receive and one transmit queue,
the MAC in config space, checksum and TCP segmentation offloads where the tap
takes them.

Every frame in either direction starts with the 12-byte virtio 1.x net header,
which is also the tap's vnet header (tap.py), so frames cross unchanged; the
header the guest sends is checked against what it negotiated first.

Transmit is served in the vCPU thread that notifies, like virtio-blk. Receive
runs in a thread of its own: it reads a frame from the tap only when it can
place it, writes it into the next chain the guest posted (validated by the
queue walker, written through GuestMemory's bounds-checked accessors) and
publishes it. A frame larger than the chain, or a transmit chain that is not a
frame, is dropped and counted; a malformed queue sets DEVICE_NEEDS_RESET.

Snapshots: pause_io() returns once a frame being written is fully written and
published, and nothing more is written until resume_io(); the saved queue
indices then describe guest memory exactly. A frame read from the tap but not
yet placed stays in the VMM and is lost with it, as a dropped packet would be.

After a restore (or an arrival by live migration) the device announces the
guest's MAC, as QEMU's self-announce does: a few RARP broadcasts with back-off,
so switches and neighbours learn where the guest now is.
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

from snapvisor.vmm.devices.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_OFFLOADS, VNET_HDR_SIZE, Tap
from snapvisor.vmm.devices.virtio.mmio import VIRTIO_F_VERSION_1
from snapvisor.vmm.devices.virtio.queue import Virtqueue
from snapvisor.vmm.errors import VmConfigError
from snapvisor.vmm.memory import GuestMemory
from snapvisor.vmm.persist import upgraded

log = logging.getLogger("snapvisor.vmm")
DEVICE_ID_NET = 1
STATE_VERSION = 1
RX_QUEUE, TX_QUEUE = 0, 1

VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
VIRTIO_NET_F_GUEST_TSO6 = 1 << 8
VIRTIO_NET_F_HOST_TSO4 = 1 << 11
VIRTIO_NET_F_HOST_TSO6 = 1 << 12
VIRTIO_NET_F_STATUS = 1 << 16
OFFLOAD_FEATURES = (VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4
                    | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6)
LINK_UP = 1

HDR_F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_ECN = 0, 1, 4, 0x80
_HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers

ETH_HEADER = 14
# The largest frame either way, after the vnet header: a 64 KiB TCP segment with
# its Ethernet and VLAN headers (what a TSO guest or a GRO'ing tap may pass; the
# limit Firecracker uses too).
MAX_FRAME = 65550
MAX_PACKET = VNET_HDR_SIZE + MAX_FRAME

# Self-announce: RARP broadcasts this long after the restored VM starts.
ANNOUNCE_AT_S = (0.0, 0.05, 0.2, 0.45, 0.8)
ETH_P_RARP = 0x8035


class NetConfigError(VmConfigError):
    """A network device's settings are not usable (MAC, tap name, duplicates)."""


def parse_mac(text: str) -> bytes:
    """Six bytes from `aa:bb:cc:dd:ee:ff`; a unicast address only."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
        raise NetConfigError(f"{text!r} is not a MAC address: write six hex pairs, like 02:00:00:00:00:01")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise NetConfigError(f"MAC {text} is a multicast address: a NIC needs a unicast one (first byte even, "
                             f"like 02:00:00:00:00:01)")
    if mac == bytes(6):
        raise NetConfigError("MAC 00:00:00:00:00:00 is not usable: give another, like 02:00:00:00:00:01")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def random_mac() -> str:
    """A locally administered unicast MAC (first byte 0x?2, 0x?6, 0x?A, 0x?E)."""
    first = (secrets.randbits(8) & 0xFC) | 0x02
    return format_mac(bytes([first]) + secrets.token_bytes(5))


def rarp_announce(mac: bytes) -> bytes:
    """A RARP "reverse request" from `mac` to everyone, padded to the Ethernet minimum:
    the frame QEMU's self-announce sends for a guest whose IP it does not know."""
    ethernet = b"\xff" * 6 + mac + struct.pack(">H", ETH_P_RARP)
    rarp = struct.pack(">HHBBH", 1, 0x0800, 6, 4, 3) + mac + bytes(4) + mac + bytes(4)
    return (ethernet + rarp).ljust(60, b"\0")


@dataclass
class NetStats:
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_dropped_oversize: int = 0  # frames larger than the chain the guest posted
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0  # chains that were not a frame the tap may take
    tx_errors: int = 0  # frames the tap refused
    announces: int = 0


Serve = Callable[[int, Callable[[GuestMemory, int, Virtqueue], bool]], None]


class VirtioNet:
    device_id = DEVICE_ID_NET
    queue_count = 2

    def __init__(self, name: str, tap: Tap, mac: bytes, announce_on_restore: bool = True) -> None:
        self.name = name  # eth0, eth1, ...
        self.tap = tap
        self.mac = mac
        self.features = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
        if tap.offloads == TUN_OFFLOADS:
            self.features |= OFFLOAD_FEATURES
        self._config = mac + struct.pack("<H", LINK_UP)
        self.negotiated = 0
        self.stats = NetStats()
        self._announce_on_restore = announce_on_restore
        self._announce_pending = False  # restored: announce once started
        self._announce_due: list[float] = []  # monotonic times of the announces still to send
        self._rx_buffer = bytearray(MAX_PACKET)
        self._rx_length: int | None = None  # a frame in _rx_buffer waiting for a chain
        self._serve: Serve | None = None
        self._state = threading.Condition()  # held while a frame is written into the guest
        self._paused = False
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self.receive_error: str | None = None  # why receiving stopped, if it did

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self._config[offset : offset + size].ljust(size, b"\0"), "little")

    def activate(self, driver_features: int) -> None:
        self.negotiated = driver_features
        offloads = 0
        if driver_features & VIRTIO_NET_F_GUEST_CSUM:
            offloads |= TUN_F_CSUM
            if driver_features & VIRTIO_NET_F_GUEST_TSO4:
                offloads |= TUN_F_TSO4
            if driver_features & VIRTIO_NET_F_GUEST_TSO6:
                offloads |= TUN_F_TSO6
        self.tap.set_offloads(offloads)

    def process(self, memory: GuestMemory, index: int, queue: Virtqueue) -> bool:
        if index == RX_QUEUE:
            self._wake()  # new receive buffers: a waiting frame may fit now
            return False
        used = False
        while (chain := queue.pop(memory)) is not None:
            self._transmit(memory, chain.readable)
            queue.push(memory, chain.head, 0)
            used = True
        return used

    # --- transmit (vCPU thread) ------------------------------------------------------
    def _transmit(self, memory: GuestMemory, buffers: list) -> None:
        length = sum(b.length for b in buffers)
        if not VNET_HDR_SIZE + ETH_HEADER <= length <= MAX_PACKET:
            self.stats.tx_dropped += 1
            return
        # Copied before the header is checked: the guest may rewrite its memory meanwhile.
        packet = bytearray(length)
        offset = 0
        for b in buffers:
            packet[offset : offset + b.length] = memory.view(b.gpa, b.length)
            offset += b.length
        if not self._header_allowed(packet):
            self.stats.tx_dropped += 1
            return
        try:
            self.tap.write([packet])
        except OSError:
            self.stats.tx_errors += 1
            return
        self.stats.tx_frames += 1
        self.stats.tx_bytes += length - VNET_HDR_SIZE

    def _header_allowed(self, packet: bytearray) -> bool:
        flags, gso_type, _, _, _, _, _ = _HDR.unpack_from(packet)
        if flags & ~HDR_F_NEEDS_CSUM:
            return False
        if flags & HDR_F_NEEDS_CSUM and not self.negotiated & VIRTIO_NET_F_CSUM:
            return False
        if gso_type & GSO_ECN:
            return False  # ECN segmentation is not offered
        if gso_type == GSO_NONE:
            return True
        wanted = {GSO_TCPV4: VIRTIO_NET_F_HOST_TSO4, GSO_TCPV6: VIRTIO_NET_F_HOST_TSO6}.get(gso_type)
        return wanted is not None and bool(self.negotiated & wanted) and bool(flags & HDR_F_NEEDS_CSUM)

    # --- receive (its own thread) ----------------------------------------------------
    def start_io(self, serve: Serve) -> None:
        self._serve = serve
        if self._announce_pending:
            started = time.monotonic()
            self._announce_due = [started + delay for delay in ANNOUNCE_AT_S]
        self._thread = threading.Thread(target=self._receive_loop, name=f"net-{self.name}", daemon=True)
        self._thread.start()

    def pause_io(self) -> None:
        with self._state:  # waits for a frame being written to be published
            self._paused = True

    def resume_io(self) -> None:
        with self._state:
            self._paused = False
            self._state.notify_all()
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\1")
        except BlockingIOError:
            pass  # already awake

    def _receive_loop(self) -> None:
        try:
            self._receive()
        except OSError as exc:
            # The tap went away under the VM (`ip link del`): the guest keeps running,
            # receives nothing more, and what it sends is counted as tx_errors.
            self.receive_error = f"tap {self.tap.name} failed: {os.strerror(exc.errno or 0)}"
            log.warning("%s; %s receives nothing more", self.receive_error, self.name)

    def _receive(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        watching_tap = False
        while True:
            with self._state:
                while self._paused and not self._closed:
                    self._state.wait()
                if self._closed:
                    return
                self._send_due_announces()
                self._deliver_what_fits()
                want_tap = self._rx_length is None  # else wait for buffers (a notify wakes us)
            if want_tap != watching_tap:
                if want_tap:
                    poller.register(self.tap.fd, select.POLLIN)
                else:
                    poller.unregister(self.tap.fd)
                watching_tap = want_tap
            timeout_ms = None
            if self._announce_due:
                timeout_ms = max(0, int((self._announce_due[0] - time.monotonic()) * 1000) + 1)
            poller.poll(timeout_ms)
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass

    def _deliver_what_fits(self) -> None:
        assert self._serve is not None
        while True:
            if self._rx_length is None:
                self._rx_length = self.tap.read_into(self._rx_buffer)
                if self._rx_length is None:
                    return
            self._serve(RX_QUEUE, self._place_frame)
            if self._rx_length is not None:
                return  # no chain for it yet (or the device is not live): a notify wakes us

    def _place_frame(self, memory: GuestMemory, index: int, queue: Virtqueue) -> bool:
        """Write the waiting frame into the next receive chain; True if one was used."""
        length = self._rx_length
        assert length is not None
        chain = queue.peek(memory)
        if chain is None:
            return False
        if length < VNET_HDR_SIZE or sum(b.length for b in chain.writable) < length:
            self._rx_length = None  # dropped; the chain stays for the next frame
            self.stats.rx_dropped_oversize += 1
            return False
        # virtio 1.x: num_buffers is 1 without mergeable buffers; the tap leaves it unset.
        self._rx_buffer[10:12] = b"\1\0"
        offset = 0
        for b in chain.writable:
            if offset == length:
                break
            piece = min(b.length, length - offset)
            memory.write(b.gpa, memoryview(self._rx_buffer)[offset : offset + piece])
            offset += piece
        queue.pop(memory)
        queue.push(memory, chain.head, length)
        self._rx_length = None
        self.stats.rx_frames += 1
        self.stats.rx_bytes += length - VNET_HDR_SIZE
        return True

    def _send_due_announces(self) -> None:
        now = time.monotonic()
        while self._announce_due and self._announce_due[0] <= now:
            self._announce_due.pop(0)
            try:
                self.tap.write([bytes(VNET_HDR_SIZE), rarp_announce(self.mac)])
                self.stats.announces += 1
            except OSError:
                self.stats.tx_errors += 1

    def close(self) -> None:
        with self._state:
            self._closed = True
            self._state.notify_all()
        self._wake()
        if self._thread is not None:
            self._thread.join()
        self.tap.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --- persistence: the rings are guest memory; here what the device is ------------
    def save(self) -> dict:
        return {"version": STATE_VERSION, "name": self.name, "mac": format_mac(self.mac)}

    def restore(self, state: dict) -> None:
        state = upgraded("virtio-net", state, STATE_VERSION)
        if state["mac"] != format_mac(self.mac):
            raise ValueError(f"network device {self.name} had MAC {state['mac']}, this one {format_mac(self.mac)}")
        self._announce_pending = self._announce_on_restore
