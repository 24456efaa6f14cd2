"""The virtio-mmio transport, version 2 (virtio 1.x): one 4 KiB register window
per device on the MMIO bus, feature negotiation, queue setup, status, and the
interrupt line.

A QueueNotify write is served right away in the vCPU thread that wrote it, so
when every vCPU is paused no request is half-done: a snapshot needs only this
register state and the queues' indices (save()), never in-flight I/O.

The driver is untrusted: a malformed queue sets DEVICE_NEEDS_RESET (and raises a
configuration-change interrupt, as the spec asks) instead of reaching the VMM.
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol

from snapvisor.vmm.devices.virtio.queue import QueueError, Virtqueue
from snapvisor.vmm.errors import GuestMemoryError
from snapvisor.vmm.memory import GuestMemory
from snapvisor.vmm.persist import upgraded

MMIO_WINDOW = 0x1000
MMIO_BASE = 0xD000_0000  # the first device; the next ones follow a window apart (docs/architecture.md)
FIRST_IRQ = 5  # IOAPIC pins 5 and up are free (COM1 uses 4)
STATE_VERSION = 1

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x534E5056  # "SNPV"

VIRTIO_F_VERSION_1 = 1 << 32

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128

INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2



class Reg:
    """Register offsets in the device's window."""

    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    CONFIG_GENERATION = 0x0FC
    CONFIG = 0x100


class VirtioDevice(Protocol):
    """What a device type (block, net) gives the transport. A device may also have
    `activate(driver_features)`, called when the driver sets DRIVER_OK (and after a
    restore of a driver-OK device), and, if it moves data on its own (net RX),
    `start_io(serve)`, `pause_io()` and `resume_io()`: the VM calls them when it
    starts, pauses and resumes (see start_io below)."""

    device_id: int
    features: int  # device feature bits, VIRTIO_F_VERSION_1 included
    queue_count: int

    def read_config(self, offset: int, size: int) -> int: ...

    def process(self, memory: GuestMemory, index: int, queue: Virtqueue) -> bool:
        """Serve every available chain of `queue` (number `index`); True if any was used.
        Raises QueueError for a malformed queue."""
        ...

    def close(self) -> None: ...

    def save(self) -> dict: ...

    def restore(self, state: dict) -> None: ...


def mmio_window(index: int) -> tuple[int, int]:
    """(base address, IRQ) of the `index`-th virtio-mmio device."""
    return MMIO_BASE + index * MMIO_WINDOW, FIRST_IRQ + index


def kernel_cmdline_option(index: int) -> str:
    """Linux's way to find a virtio-mmio device without ACPI or a device tree
    (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES); the test guest parses it too."""
    base, irq = mmio_window(index)
    return f"virtio_mmio.device=4K@{base:#x}:{irq}"


class VirtioMmioTransport:
    def __init__(self, device: VirtioDevice, memory: GuestMemory, raise_irq: Callable[[], None]) -> None:
        self.device = device
        self._memory = memory
        self._raise_irq = raise_irq
        self._lock = threading.Lock()  # vCPUs may touch the registers concurrently
        self.queues = [Virtqueue() for _ in range(device.queue_count)]
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        for queue in self.queues:
            queue.reset()

    @property
    def _queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    # --- bus interface ------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset >= Reg.CONFIG:
                return self.device.read_config(offset - Reg.CONFIG, size)
            if size != 4 or offset % 4:
                return 0  # the spec allows only aligned 32-bit register access
            queue = self._queue
            match offset:
                case Reg.MAGIC_VALUE:
                    return MAGIC
                case Reg.VERSION:
                    return VERSION
                case Reg.DEVICE_ID:
                    return self.device.device_id
                case Reg.VENDOR_ID:
                    return VENDOR_ID
                case Reg.DEVICE_FEATURES:
                    return (self.device.features >> (32 * self.device_features_sel)) & 0xFFFFFFFF if self.device_features_sel < 2 else 0
                case Reg.QUEUE_NUM_MAX:
                    return queue.max_size if queue else 0
                case Reg.QUEUE_READY:
                    return int(queue.ready) if queue else 0
                case Reg.INTERRUPT_STATUS:
                    return self.interrupt_status
                case Reg.STATUS:
                    return self.status
                case Reg.CONFIG_GENERATION:
                    return self.config_generation
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset >= Reg.CONFIG or size != 4 or offset % 4:
                return  # block config space is read-only; other widths are ignored
            queue = self._queue
            # Queue layout may change only while the queue is not ready.
            configurable = queue is not None and not queue.ready
            match offset:
                case Reg.DEVICE_FEATURES_SEL:
                    self.device_features_sel = value
                case Reg.DRIVER_FEATURES:
                    if self.status & STATUS_FEATURES_OK == 0 and self.driver_features_sel < 2:
                        shift = 32 * self.driver_features_sel
                        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
                case Reg.DRIVER_FEATURES_SEL:
                    self.driver_features_sel = value
                case Reg.QUEUE_SEL:
                    self.queue_sel = value
                case Reg.QUEUE_NUM if configurable:
                    queue.size = value
                case Reg.QUEUE_READY if queue is not None:
                    self._set_queue_ready(queue, value == 1)
                case Reg.QUEUE_NOTIFY:
                    self._notify(value)
                case Reg.INTERRUPT_ACK:
                    self.interrupt_status &= ~value
                case Reg.STATUS:
                    self._set_status(value)
                case Reg.QUEUE_DESC_LOW if configurable:
                    queue.desc_addr = _set_half(queue.desc_addr, value, high=False)
                case Reg.QUEUE_DESC_HIGH if configurable:
                    queue.desc_addr = _set_half(queue.desc_addr, value, high=True)
                case Reg.QUEUE_DRIVER_LOW if configurable:
                    queue.avail_addr = _set_half(queue.avail_addr, value, high=False)
                case Reg.QUEUE_DRIVER_HIGH if configurable:
                    queue.avail_addr = _set_half(queue.avail_addr, value, high=True)
                case Reg.QUEUE_DEVICE_LOW if configurable:
                    queue.used_addr = _set_half(queue.used_addr, value, high=False)
                case Reg.QUEUE_DEVICE_HIGH if configurable:
                    queue.used_addr = _set_half(queue.used_addr, value, high=True)

    # --- state machine ---------------------------------------------------------------------
    def _set_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        value &= 0xFF
        if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
            # Accept only features we offered, and only a virtio 1.x driver.
            if self.driver_features & ~self.device.features or not self.driver_features & VIRTIO_F_VERSION_1:
                value &= ~STATUS_FEATURES_OK
        was_ok = self.driver_ok
        # NEEDS_RESET is the device's to set; only a reset (writing 0) clears it.
        self.status = (value & ~STATUS_NEEDS_RESET) | (self.status & STATUS_NEEDS_RESET)
        if self.driver_ok and not was_ok:
            self._activate()

    def _activate(self) -> None:
        activate = getattr(self.device, "activate", None)
        if activate is not None:
            activate(self.driver_features)

    def _set_queue_ready(self, queue: Virtqueue, ready: bool) -> None:
        if not ready:
            queue.ready = False
            return
        try:
            queue.check_layout(self._memory)
        except QueueError:
            self._needs_reset()
            return
        queue.ready = True

    @property
    def driver_ok(self) -> bool:
        """Served only after a completed negotiation, and not once broken or failed."""
        wanted = STATUS_DRIVER_OK | STATUS_FEATURES_OK
        return self.status & (wanted | STATUS_NEEDS_RESET | STATUS_FAILED) == wanted

    def _notify(self, index: int) -> None:
        self._serve(index, self.device.process)

    def serve_queue(self, index: int, work: Callable[[GuestMemory, int, Virtqueue], bool]) -> None:
        """Run `work` on queue `index` as a QueueNotify would, from a device's own
        thread (net RX): under the register lock, only on a driver-OK device and a
        ready queue; a malformed queue sets DEVICE_NEEDS_RESET, used buffers interrupt."""
        with self._lock:
            self._serve(index, work)

    def _serve(self, index: int, work: Callable[[GuestMemory, int, Virtqueue], bool]) -> None:
        if not self.driver_ok or index >= len(self.queues) or not self.queues[index].ready:
            return
        queue = self.queues[index]
        try:
            used = work(self._memory, index, queue)
        except (QueueError, GuestMemoryError):
            self._needs_reset()
            return
        if used and queue.wants_interrupt(self._memory):
            self.interrupt_status |= INT_USED_BUFFER
            self._raise_irq()

    def _needs_reset(self) -> None:
        self.status |= STATUS_NEEDS_RESET
        for queue in self.queues:
            queue.ready = False
        if self.status & STATUS_DRIVER_OK:
            self.interrupt_status |= INT_CONFIG_CHANGE
            self._raise_irq()

    # --- devices that move data on their own (net RX) -------------------------------------
    def start_io(self) -> None:
        """The VM started: the device may deliver, through serve_queue()."""
        start = getattr(self.device, "start_io", None)
        if start is not None:
            start(self.serve_queue)

    def pause_io(self) -> None:
        """The VM paused: returns once the device has finished what it was writing
        into guest memory and will write nothing more until resume_io()."""
        pause = getattr(self.device, "pause_io", None)
        if pause is not None:
            pause()

    def resume_io(self) -> None:
        resume = getattr(self.device, "resume_io", None)
        if resume is not None:
            resume()

    def close(self) -> None:
        self.device.close()

    # --- persistence ---------------------------------------------------------------------
    def save(self) -> dict:
        with self._lock:
            return {
                "version": STATE_VERSION,
                "status": self.status,
                "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel,
                "driver_features": self.driver_features,
                "queue_sel": self.queue_sel,
                "interrupt_status": self.interrupt_status,
                "config_generation": self.config_generation,
                "queues": [queue.save() for queue in self.queues],
                "device": self.device.save(),
            }

    def restore(self, state: dict) -> None:
        state = upgraded("virtio-mmio", state, STATE_VERSION)
        if len(state["queues"]) != len(self.queues):
            raise ValueError(f"saved virtio device has {len(state['queues'])} queues, this one {len(self.queues)}")
        with self._lock:
            for name in ("status", "device_features_sel", "driver_features_sel", "driver_features",
                         "queue_sel", "interrupt_status", "config_generation"):
                setattr(self, name, int(state[name]))
            for queue, queue_state in zip(self.queues, state["queues"]):
                queue.restore(queue_state)
                if queue.ready:
                    try:
                        queue.check_layout(self._memory)
                    except QueueError as exc:
                        raise ValueError(f"saved virtqueue is unusable: {exc}") from None
            self.device.restore(state["device"])
            if self.driver_ok:
                self._activate()


def _set_half(current: int, value: int, high: bool) -> int:
    if high:
        return (current & 0xFFFFFFFF) | (value & 0xFFFFFFFF) << 32
    return (current & ~0xFFFFFFFF) | (value & 0xFFFFFFFF)
