"""The in-kernel interrupt controllers (PIC pair, IOAPIC; each vCPU's LAPIC is
saved with the vCPU), the in-kernel PIT (channel 0 on IRQ 0, owns ports
0x40-0x43 and 0x61) and the VM clock, as one stateful part."""

from __future__ import annotations

import time

from snapvisor.vmm.errors import VmStateError
from snapvisor.vmm.kvm import VmFd, ffi
from snapvisor.vmm.kvm import bindings as b
from snapvisor.vmm.kvm.bindings import CData

STATE_VERSION = 1
# Where KVM's in-kernel LAPICs and IOAPIC sit (the PC defaults); the MP table
# and the ACPI MADT tell the guest.
LAPIC_ADDR = 0xFEE00000
IOAPIC_ADDR = 0xFEC00000
_CHIPS = {
    "pic_master": b.KVM_IRQCHIP_PIC_MASTER,
    "pic_slave": b.KVM_IRQCHIP_PIC_SLAVE,
    "ioapic": b.KVM_IRQCHIP_IOAPIC,
}


class Irqchip:
    def __init__(self, vm_fd: VmFd) -> None:
        self._vm_fd = vm_fd

    @classmethod
    def create(cls, vm_fd: VmFd) -> "Irqchip":
        vm_fd.create_irqchip()
        vm_fd.create_pit2(b.KVM_PIT_SPEAKER_DUMMY)
        return cls(vm_fd)

    def set_irq_line(self, irq: int, level: int) -> None:
        self._vm_fd.irq_line(irq, level)

    def save(self) -> dict:
        state = {"version": STATE_VERSION}
        for name, chip_id in _CHIPS.items():
            state[name] = bytes(ffi.buffer(self._vm_fd.get_irqchip(chip_id)))
        state["pit"] = bytes(ffi.buffer(self._vm_fd.get_pit2()))
        state["clock"] = bytes(ffi.buffer(self._vm_fd.get_clock()))
        state["clock_saved_at_ns"] = time.clock_gettime_ns(time.CLOCK_REALTIME)
        return state

    def restore(self, state: dict) -> None:
        """PIT, then clock, then the PICs and the IOAPIC."""
        if state.get("version") != STATE_VERSION:
            raise VmStateError(f"irqchip state version {state.get('version')} is not {STATE_VERSION}")
        self._vm_fd.set_pit2(_load("struct kvm_pit_state2", state["pit"]))
        clock = _load("struct kvm_clock_data", state["clock"])
        self._vm_fd.set_clock(self._clock_now(clock, state.get("clock_saved_at_ns")))
        for name, chip_id in _CHIPS.items():
            chip = _load("struct kvm_irqchip", state[name])
            if chip.chip_id != chip_id:
                raise VmStateError(f"saved {name} carries chip id {chip.chip_id}, expected {chip_id}")
            self._vm_fd.set_irqchip(chip)


    def _clock_now(self, clock: CData, saved_at_ns: int | None) -> CData:
        """The saved VM clock moved on by the host time since it was saved, so a
        restored or migrated guest reads the current wall time (its clock
        counted on while the VM was stopped, as a real one would have).

        KVM does it exactly where both the saved clock and this host's KVM
        know the realtime pairing (KVM_CLOCK_REALTIME): the clock is advanced
        by the realtime elapsed inside the ioctl. Elsewhere the advance is
        the host realtime elapsed since `saved_at_ns`, taken just before the
        ioctl. A state saved before snapvisor recorded `saved_at_ns` restores
        the clock as it was."""
        if saved_at_ns is not None and not isinstance(saved_at_ns, int):
            raise VmStateError(f"saved clock time {saved_at_ns!r} is not an integer")
        supported = self._vm_fd.check_extension(b.KVM_CAP_ADJUST_CLOCK)
        if clock.flags & b.KVM_CLOCK_REALTIME and supported & b.KVM_CLOCK_REALTIME:
            clock.flags = b.KVM_CLOCK_REALTIME
            return clock
        clock.flags = 0
        if saved_at_ns is not None:
            clock.clock += max(0, time.clock_gettime_ns(time.CLOCK_REALTIME) - saved_at_ns)
        return clock


def _load(ctype: str, data: bytes) -> CData:
    size = ffi.sizeof(ctype)
    if len(data) != size:
        raise VmStateError(f"saved {ctype} is {len(data)} bytes, expected {size}")
    cdata = ffi.new(ctype + " *")
    ffi.memmove(cdata, data, size)
    return cdata
