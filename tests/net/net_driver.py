"""A virtio-net driver written from the guest's side, for tests: it sets the
device up through its MMIO registers like a guest would, keeps its rings in real
guest memory (a GuestMemory of a real KVM VM), and the device sits on a real tap
in a network namespace, where a packet socket sends frames to it and sees what
it sends. Module name unique: every test directory is on sys.path."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

from netlab import TapHost, inside, ip
from snapvisor.vmm.devices.tap import Tap
from snapvisor.vmm.devices.virtio.mmio import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
    Reg,
    VirtioMmioTransport,
)
from snapvisor.vmm.devices.virtio.net import RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_MAC, VirtioNet
from snapvisor.vmm.kvm import Kvm, VmFd
from snapvisor.vmm.memory import GuestMemory

MiB = 1 << 20
RAM = 2 * MiB
MAC = bytes.fromhex("02aabbccdd01")
PEER = bytes.fromhex("02aabbccdd02")
ETH_TEST = 0x88B5  # IEEE local experimental ethertype: frames no host stack answers
DESC_F_NEXT, DESC_F_WRITE = 1, 2
STATUS_ALL_OK = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
HDR = 12


@dataclass
class Ring:
    index: int
    size: int
    desc: int
    avail: int
    used: int
    avail_idx: int = 0
    seen_used: int = 0


@dataclass
class NetRig:
    host: TapHost
    tap_name: str
    kvm: Kvm
    vm_fd: VmFd
    memory: GuestMemory
    device: VirtioNet
    transport: VirtioMmioTransport
    sniffer: socket.socket
    interrupts: list[int] = field(default_factory=list)
    rx: Ring = field(default_factory=lambda: Ring(RX_QUEUE, 256, 0x10000, 0x11000, 0x12000))
    tx: Ring = field(default_factory=lambda: Ring(TX_QUEUE, 16, 0x14000, 0x15000, 0x16000))

    def reg(self, offset: int) -> int:
        return self.transport.read(offset, 4)

    def set_reg(self, offset: int, value: int) -> None:
        self.transport.write(offset, 4, value)

    def setup(self, features: int = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC) -> int:
        """The driver's initialisation sequence; returns the status register after it."""
        self.set_reg(Reg.STATUS, 0)
        self.set_reg(Reg.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        for sel in (0, 1):
            self.set_reg(Reg.DRIVER_FEATURES_SEL, sel)
            self.set_reg(Reg.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.set_reg(Reg.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        for ring in (self.rx, self.tx):
            self.set_reg(Reg.QUEUE_SEL, ring.index)
            self.set_reg(Reg.QUEUE_NUM, ring.size)
            for low, gpa in ((Reg.QUEUE_DESC_LOW, ring.desc), (Reg.QUEUE_DRIVER_LOW, ring.avail),
                             (Reg.QUEUE_DEVICE_LOW, ring.used)):
                self.set_reg(low, gpa)
                self.set_reg(low + 4, 0)
            self.memory.write(ring.avail, bytes(4))
            self.memory.write(ring.used, bytes(4))
            ring.avail_idx = ring.seen_used = 0
            self.set_reg(Reg.QUEUE_READY, 1)
        self.set_reg(Reg.STATUS, STATUS_ALL_OK)
        return self.reg(Reg.STATUS)

    def put_desc(self, ring: Ring, index: int, gpa: int, length: int, flags: int, next_index: int = 0) -> None:
        self.memory.write(ring.desc + 16 * index, struct.pack("<QIHH", gpa, length, flags, next_index))

    def offer(self, ring: Ring, head: int) -> None:
        self.memory.write(ring.avail + 4 + 2 * (ring.avail_idx % ring.size), struct.pack("<H", head))
        ring.avail_idx = (ring.avail_idx + 1) & 0xFFFF
        self.memory.write(ring.avail + 2, struct.pack("<H", ring.avail_idx))

    def notify(self, ring: Ring) -> None:
        self.set_reg(Reg.QUEUE_NOTIFY, ring.index)

    def used_idx(self, ring: Ring) -> int:
        return struct.unpack("<H", self.memory.read(ring.used + 2, 2))[0]

    def used_elem(self, ring: Ring, slot: int) -> tuple[int, int]:
        return struct.unpack("<II", self.memory.read(ring.used + 4 + 8 * (slot % ring.size), 8))

    def take_used(self, ring: Ring) -> list[tuple[int, int]]:
        """The used entries published since the last call: (head, length)."""
        out = []
        while ring.seen_used != self.used_idx(ring):
            out.append(self.used_elem(ring, ring.seen_used))
            ring.seen_used = (ring.seen_used + 1) & 0xFFFF
        return out

    # --- the frames themselves ------------------------------------------------------
    def post_rx(self, buffers: list[tuple[int, int]]) -> None:
        """One single-descriptor receive chain per (gpa, length), then a notify."""
        for gpa, length in buffers:
            index = self.rx.avail_idx % self.rx.size
            self.put_desc(self.rx, index, gpa, length, DESC_F_WRITE)
            self.offer(self.rx, index)
        self.notify(self.rx)

    def transmit(self, packet: bytes, gpa: int = 0x40000) -> tuple[int, int]:
        """`packet` (vnet header first) as one chain on the transmit queue; its used entry."""
        self.memory.write(gpa, packet)
        index = self.tx.avail_idx % self.tx.size
        self.put_desc(self.tx, index, gpa, len(packet), 0)
        self.offer(self.tx, index)
        self.notify(self.tx)
        used = self.take_used(self.tx)
        assert len(used) == 1, "the device did not complete the transmit synchronously"
        return used[0]

    @staticmethod
    def frame(payload: bytes) -> bytes:
        """A test frame from the peer to the guest."""
        return MAC + PEER + struct.pack("!H", ETH_TEST) + payload

    def inject(self, payload: bytes) -> bytes:
        """Send a test frame into the tap, as the host's network would; returns it."""
        frame = self.frame(payload)
        self.sniffer.send(frame)
        return frame

    def sniffed(self, timeout: float = 1.0) -> list[bytes]:
        """Test frames the device wrote into the tap within `timeout`."""
        out = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sniffer.settimeout(left)
            try:
                frame, address = self.sniffer.recvfrom(70000)
            except socket.timeout:
                break
            if address[2] != socket.PACKET_OUTGOING and frame[12:14] == struct.pack("!H", ETH_TEST):
                out.append(frame)
        return out

    def wait_for(self, condition, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.005)


def make_net_rig(host: TapHost, tap_name: str = "svrig0") -> NetRig:
    host.add_tap(tap_name, address=None)
    ip("-n", host.ns, "link", "set", tap_name, "mtu", "9000")  # room for frames larger than a guest buffer
    with inside(host.ns):
        tap = Tap.open(tap_name)
    kvm = Kvm.open()
    vm_fd = kvm.create_vm()
    memory = GuestMemory.create(vm_fd, RAM)
    memory.enable_dirty_log()
    device = VirtioNet("eth0", tap, MAC)
    interrupts: list[int] = []
    transport = VirtioMmioTransport(device, memory, lambda: interrupts.append(1))
    sniffer = host.sniffer(tap_name)
    return NetRig(host, tap_name, kvm, vm_fd, memory, device, transport, sniffer, interrupts)


def close_net_rig(rig: NetRig) -> None:
    rig.transport.close()
    rig.sniffer.close()
    rig.memory.close()
    rig.vm_fd.close()
    rig.kvm.close()
