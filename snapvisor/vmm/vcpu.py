"""One vCPU: its boot configuration, its state save/restore, and its run loop
(one thread per vCPU; the loop is a single dispatch on the exit reason)."""

from __future__ import annotations

import errno
import signal
import struct
import threading
from typing import TYPE_CHECKING

from snapvisor.vmm.bus import BusDevice, MmioBus, PioBus
from snapvisor.vmm.errors import KvmError, VmRuntimeError, VmStateError
from snapvisor.vmm.exit_status import ERROR_EXIT_CODE, ExitStatus
from snapvisor.vmm.kvm import VcpuFd, ffi
from snapvisor.vmm.kvm.bindings import CData
from snapvisor.vmm.kvm import bindings as b
from snapvisor.vmm.loader import x86

if TYPE_CHECKING:
    from snapvisor.vmm.vm import VcpuControl

STATE_VERSION = 1

# The signal that kicks a vCPU out of KVM_RUN. vCPU threads keep it blocked and
# KVM_SET_SIGNAL_MASK unblocks it only inside KVM_RUN (QEMU's scheme): a kick
# that lands while the thread is in Python stays pending and makes the next
# KVM_RUN return EINTR at once, so no kick is ever lost. This is used instead
# of `immediate_exit` on purpose: immediate_exit returns before KVM moves
# expired LAPIC-timer interrupts into the LAPIC, and a state saved then would
# lose them (an AP sleeping on a one-shot timer never wakes after restore).
# A real-time signal, so it never collides with the usual ones.
KICK_SIGNAL = signal.SIGRTMIN + 2
_KERNEL_SIGSET_BYTES = 8

MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1 << 0

MSR_IA32_TSC_DEADLINE = 0x6E0

LAPIC_LVT_TIMER = 0x320
LAPIC_TIMER_CURRENT_COUNT = 0x390
LVT_TIMER_MODE_SHIFT = 17
LVT_TIMER_MODE_MASK = 0x3
LVT_TIMER_ONE_SHOT = 0
LVT_TIMER_TSC_DEADLINE = 2
LAPIC_LVT0 = 0x350
LAPIC_LVT1 = 0x360
LVT_DELIVERY_MODE_MASK = 0x700
LVT_MODE_EXTINT = 0x700
LVT_MODE_NMI = 0x400
LVT_MASKED = 1 << 16

CPUID_FEATURES = 0x1
CPUID_EXT_TOPOLOGY = 0xB
CPUID_EXT_TOPOLOGY_V2 = 0x1F
CPUID_HYPERVISOR_BIT = 1 << 31

# exit_reason, then struct kvm_run_io at the start of the exit union
_EXIT_AND_IO = struct.Struct(f"<I{b.RUN_EXIT_UNION_OFFSET - b.RUN_EXIT_REASON_OFFSET - 4}xBBHIQ")
_SIZE_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}
_UNCLAIMED_READ = 0xFFFFFFFF  # nothing answers: the bus floats high
_LE_U32 = struct.Struct("<I")


def _kick_handler(signum: int, frame: object) -> None:
    """Intentionally empty: only reached if a kick is ever delivered outside KVM_RUN."""


def install_kick_handler() -> None:
    """A no-op handler for KICK_SIGNAL, so a stray kick cannot kill the process
    (the default action of a real-time signal). Python only lets the main
    thread install handlers; elsewhere the blocking scheme alone is relied on."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(KICK_SIGNAL) is not _kick_handler:
        signal.signal(KICK_SIGNAL, _kick_handler)


def _sigset_bytes(signals: set[int]) -> bytes:
    bits = 0
    for number in signals:
        bits |= 1 << (int(number) - 1)
    return bits.to_bytes(_KERNEL_SIGSET_BYTES, "little")


def _drain_kicks() -> None:
    """Consume kicks that are pending for this thread (they queue: real-time signal)."""
    while signal.sigtimedwait([KICK_SIGNAL], 0) is not None:
        pass


def block_kicks_in_this_thread() -> set[int]:
    """Block KICK_SIGNAL in the calling thread; returns the previous mask."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})


def vcpu_cpuid(supported: CData, apic_id: int) -> CData:
    """A copy of KVM_GET_SUPPORTED_CPUID's table with this vCPU's APIC id filled in."""
    table = ffi.new("struct kvm_cpuid2 *", {"nent": supported.nent, "entries": supported.nent})
    ffi.memmove(table.entries, supported.entries, supported.nent * ffi.sizeof("struct kvm_cpuid_entry2"))
    for i in range(table.nent):
        entry = table.entries[i]
        if entry.function == CPUID_FEATURES:
            entry.ebx = (entry.ebx & 0x00FFFFFF) | (apic_id << 24)
            entry.ecx |= CPUID_HYPERVISOR_BIT
        elif entry.function in (CPUID_EXT_TOPOLOGY, CPUID_EXT_TOPOLOGY_V2):
            entry.edx = apic_id
    return table


def _timer_armed(lapic: bytes, tsc_deadline: int) -> bool:
    """Whether the LAPIC timer will fire once more without the guest re-arming it
    (a periodic timer always will; losing one of its ticks is harmless)."""
    lvt = _LE_U32.unpack_from(lapic, LAPIC_LVT_TIMER)[0]
    mode = (lvt >> LVT_TIMER_MODE_SHIFT) & LVT_TIMER_MODE_MASK
    if mode == LVT_TIMER_ONE_SHOT:
        return _LE_U32.unpack_from(lapic, LAPIC_TIMER_CURRENT_COUNT)[0] != 0
    if mode == LVT_TIMER_TSC_DEADLINE:
        return tsc_deadline != 0
    return False


def _struct_bytes(cdata: CData) -> bytes:
    return bytes(ffi.buffer(cdata))


def _struct_from(ctype: str, data: bytes, what: str) -> CData:
    expected = ffi.sizeof(ctype)
    if len(data) != expected:
        raise VmStateError(f"saved {what} is {len(data)} bytes, this host's {ctype} is {expected}")
    cdata = ffi.new(ctype + " *")
    ffi.memmove(cdata, data, expected)
    return cdata


class Vcpu:
    def __init__(
        self,
        index: int,
        fd: VcpuFd,
        pio_bus: PioBus,
        mmio_bus: MmioBus,
        msr_indices: list[int],
        xsave_size: int,
    ) -> None:
        self.index = index
        self.fd = fd
        self._pio_bus = pio_bus
        self._mmio_bus = mmio_bus
        self._msr_indices = msr_indices
        self._xsave_size = xsave_size
        self._cpuid_bytes = b""
        self.thread: threading.Thread | None = None
        # Inside KVM_RUN: the creating thread's mask, with kicks let through.
        current = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        fd.set_signal_mask(_sigset_bytes(set(current) - {KICK_SIGNAL}))

    # --- configuration -------------------------------------------------------
    def set_cpuid(self, cpuid: CData) -> None:
        self.fd.set_cpuid2(cpuid)
        self._cpuid_bytes = bytes(ffi.buffer(cpuid.entries, cpuid.nent * ffi.sizeof("struct kvm_cpuid_entry2")))

    def configure_for_boot(self, supported_cpuid: CData, entry: int | None) -> None:
        """CPUID, MSRs and LAPIC for a fresh CPU; with `entry`, 64-bit mode at
        that address and RUNNABLE (otherwise an AP waits for INIT/SIPI)."""
        self.set_cpuid(vcpu_cpuid(supported_cpuid, self.index))
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": 1, "entries": 1})
        msrs.entries[0].index = MSR_IA32_MISC_ENABLE
        msrs.entries[0].data = MISC_ENABLE_FAST_STRING
        self.fd.set_msrs(msrs)
        self._route_legacy_interrupts()
        if entry is None:
            # An AP as on a PC at power-on: in its reset state, waiting for the
            # INIT/SIPI that the guest's BSP sends through the in-kernel LAPIC.
            self.fd.set_mp_state(ffi.new("struct kvm_mp_state *", {"mp_state": b.KVM_MP_STATE_UNINITIALIZED}))
            return
        sregs = self.fd.get_sregs()
        x86.set_long_mode_sregs(sregs)
        self.fd.set_sregs(sregs)
        regs = ffi.new("struct kvm_regs *")
        x86.set_entry_regs(regs, entry)
        self.fd.set_regs(regs)
        self.fd.set_mp_state(ffi.new("struct kvm_mp_state *", {"mp_state": b.KVM_MP_STATE_RUNNABLE}))

    def _route_legacy_interrupts(self) -> None:
        """LINT0 = ExtINT (PIC output, virtual-wire mode), LINT1 = NMI, as a
        PC's firmware leaves them: a guest that never programs its LAPIC still
        gets PIC interrupts."""
        lapic = self.fd.get_lapic()
        registers = ffi.buffer(lapic.regs)
        for offset, mode in ((LAPIC_LVT0, LVT_MODE_EXTINT), (LAPIC_LVT1, LVT_MODE_NMI)):
            value = _LE_U32.unpack_from(registers, offset)[0]
            value = (value & ~(LVT_DELIVERY_MODE_MASK | LVT_MASKED)) | mode
            _LE_U32.pack_into(registers, offset, value)
        self.fd.set_lapic(lapic)

    # --- persistence -------------------------------------------------------------
    def save(self) -> dict:
        """The vCPU's state, with no timer interrupt lost in KVM's hands.

        A LAPIC timer keeps running while the vCPU is parked. When it fires,
        KVM only notes it and moves it into the LAPIC on the next KVM_RUN, so
        it would be missing from a state read in between: flush first, and
        flush again if the timer fired while the state was being read."""
        lapic = self.fd.get_lapic()
        armed_before = _timer_armed(bytes(ffi.buffer(lapic.regs)), self._tsc_deadline())
        self.flush_pending_interrupts()
        state = self._read_state()
        if armed_before and not _timer_armed(state["lapic"], dict(state["msrs"]).get(MSR_IA32_TSC_DEADLINE, 0)):
            self.flush_pending_interrupts()
            state = self._read_state()
        return state

    def _tsc_deadline(self) -> int:
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": 1, "entries": 1})
        msrs.entries[0].index = MSR_IA32_TSC_DEADLINE
        return msrs.entries[0].data if self.fd.get_msrs(msrs) == 1 else 0

    def _read_state(self) -> dict:
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(self._msr_indices), "entries": len(self._msr_indices)})
        for i, index in enumerate(self._msr_indices):
            msrs.entries[i].index = index
        read = self.fd.get_msrs(msrs)
        if read != len(self._msr_indices):
            raise VmStateError(f"vCPU {self.index}: KVM_GET_MSRS read {read} of {len(self._msr_indices)} MSRs")
        xsave = self.fd.get_xsave2(self._xsave_size) if self._xsave_size > 4096 else self.fd.get_xsave()
        return {
            "version": STATE_VERSION,
            "index": self.index,
            "cpuid": self._cpuid_bytes,
            "regs": _struct_bytes(self.fd.get_regs()),
            "sregs": _struct_bytes(self.fd.get_sregs()),
            "fpu": _struct_bytes(self.fd.get_fpu()),
            "xsave": bytes(ffi.buffer(xsave, max(self._xsave_size, 4096))),
            "xcrs": _struct_bytes(self.fd.get_xcrs()),
            "msrs": [(msrs.entries[i].index, msrs.entries[i].data) for i in range(read)],
            "lapic": _struct_bytes(self.fd.get_lapic()),
            "vcpu_events": _struct_bytes(self.fd.get_vcpu_events()),
            "debugregs": _struct_bytes(self.fd.get_debugregs()),
            "mp_state": self.fd.get_mp_state().mp_state,
        }

    def restore(self, state: dict) -> None:
        """Order matters: CPUID first (it shapes what the rest accepts), LAPIC
        before MSRs (TSC deadline) and before VCPU_EVENTS, MP_STATE last."""
        if state.get("version") != STATE_VERSION:
            raise VmStateError(f"vCPU state version {state.get('version')} is not {STATE_VERSION}")
        entry_size = ffi.sizeof("struct kvm_cpuid_entry2")
        count = len(state["cpuid"]) // entry_size
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": count, "entries": count})
        ffi.memmove(cpuid.entries, state["cpuid"], count * entry_size)
        self.set_cpuid(cpuid)
        self.fd.set_sregs(_struct_from("struct kvm_sregs", state["sregs"], "sregs"))
        self.fd.set_regs(_struct_from("struct kvm_regs", state["regs"], "regs"))
        self.fd.set_fpu(_struct_from("struct kvm_fpu", state["fpu"], "fpu"))
        xsave_data = state["xsave"]
        if len(xsave_data) < 4096:
            raise VmStateError(f"saved xsave area is {len(xsave_data)} bytes, at least 4096 expected")
        xsave = ffi.new("struct kvm_xsave *", {"extra": (len(xsave_data) - 4096) // 4})
        ffi.memmove(xsave, xsave_data, len(xsave_data))
        self.fd.set_xsave(xsave)
        self.fd.set_xcrs(_struct_from("struct kvm_xcrs", state["xcrs"], "xcrs"))
        self.fd.set_lapic(_struct_from("struct kvm_lapic_state", state["lapic"], "lapic"))
        saved_msrs = state["msrs"]
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(saved_msrs), "entries": len(saved_msrs)})
        for i, (index, data) in enumerate(saved_msrs):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        written = self.fd.set_msrs(msrs)
        if written != len(saved_msrs):
            raise VmStateError(
                f"vCPU {self.index}: this host refused MSR {saved_msrs[written][0]:#x} (KVM_SET_MSRS wrote {written} of {len(saved_msrs)})"
            )
        self.fd.set_debugregs(_struct_from("struct kvm_debugregs", state["debugregs"], "debugregs"))
        self.fd.set_vcpu_events(_struct_from("struct kvm_vcpu_events", state["vcpu_events"], "vcpu_events"))
        self.fd.set_mp_state(ffi.new("struct kvm_mp_state *", {"mp_state": state["mp_state"]}))
        self._mark_clock_stopped()

    def _mark_clock_stopped(self) -> None:
        """Tell a kvmclock guest that it was stopped (KVM_KVMCLOCK_CTRL, as QEMU
        does on resume): the VM clock moves on by the time the VM was down
        (Irqchip.restore), and Linux's soft-lockup watchdog then takes the
        jump for a pause, not a hang. EINVAL: the guest does not use kvmclock."""
        try:
            self.fd.kvmclock_ctrl()
        except KvmError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTTY):
                raise

    # --- running ----------------------------------------------------------------------
    def kick(self) -> None:
        """Make the vCPU thread leave KVM_RUN (now, or at its next entry)."""
        thread = self.thread
        if thread is not None and thread.ident is not None and thread.is_alive():
            try:
                signal.pthread_kill(thread.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass  # the thread ended between the check and the kill

    def flush_pending_interrupts(self) -> None:
        """With the vCPU parked: one KVM_RUN that cannot enter the guest (a kick
        is pending) but lets KVM move interrupts it is holding back, such as an
        expired LAPIC timer, into the saved LAPIC/event state."""
        previous = block_kicks_in_this_thread()
        try:
            signal.pthread_kill(threading.get_ident(), KICK_SIGNAL)
            try:
                self.fd.run_once()
            except KvmError as exc:
                if exc.errno not in (errno.EINTR, errno.EAGAIN):
                    raise
            else:
                raise VmRuntimeError(
                    f"vCPU {self.index}: KVM_RUN ran with a kick pending (exit {self.fd.run.exit_reason})"
                )
            _drain_kicks()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def run_loop(self, control: "VcpuControl") -> None:
        """The vCPU thread's body; Vm.start() starts it with kicks blocked."""
        try:
            status = self._run(control)
        except KvmError as exc:
            status = ExitStatus(ERROR_EXIT_CODE, "error", f"vCPU {self.index}: {exc}")
        except Exception as exc:  # a device bug must not leave the VM hanging
            status = ExitStatus(ERROR_EXIT_CODE, "error", f"vCPU {self.index}: VMM failure: {exc!r}")
        control.vcpu_finished(self, status)

    def _run(self, control: "VcpuControl") -> ExitStatus | None:
        fd = self.fd
        run = fd.run
        buffer = fd.run_buffer
        kvm_run = fd.run_call()
        pio_lookup = self._pio_bus.lookup
        unpack_exit = _EXIT_AND_IO.unpack_from
        exit_offset = b.RUN_EXIT_REASON_OFFSET
        # A pause or stop requested before this thread was alive sent it no kick.
        if self._stop_requested(control):
            return None
        while True:
            if kvm_run() < 0:
                error = ffi.errno
                if error not in (errno.EINTR, errno.EAGAIN):
                    raise KvmError("KVM_RUN", error)
                _drain_kicks()
                if self._stop_requested(control):
                    return None
                continue

            # One read for the exit reason and the port-I/O fields (meaningless,
            # and unused, for other exits).
            reason, direction, size, port, count, data_offset = unpack_exit(buffer, exit_offset)
            match reason:
                case b.KVM_EXIT_IO:
                    target = pio_lookup(port)
                    if count != 1:
                        self._string_io(target, direction, size, count, data_offset, buffer)
                    elif direction == b.KVM_EXIT_IO_OUT:
                        if target is not None:  # writes to unclaimed ports are dropped
                            target[0].write(
                                target[1],
                                size,
                                buffer[data_offset] if size == 1 else int.from_bytes(buffer[data_offset : data_offset + size], "little"),
                            )
                    else:
                        value = target[0].read(target[1], size) if target is not None else _UNCLAIMED_READ
                        buffer[data_offset : data_offset + size] = (value & _SIZE_MASK[size]).to_bytes(size, "little")
                case b.KVM_EXIT_MMIO:
                    self._handle_mmio(run.u.mmio)
                case b.KVM_EXIT_INTR:
                    pass  # a signal arrived; the next KVM_RUN returns EINTR or continues
                case b.KVM_EXIT_SHUTDOWN:
                    return ExitStatus(0, "reset", f"vCPU {self.index} triple-faulted (KVM_EXIT_SHUTDOWN)")
                case b.KVM_EXIT_SYSTEM_EVENT:
                    event = run.u.system_event.type
                    if event == b.KVM_SYSTEM_EVENT_RESET:
                        return ExitStatus(0, "reset", "the guest asked for a reset")
                    if event == b.KVM_SYSTEM_EVENT_SHUTDOWN:
                        return ExitStatus(0, "poweroff", "the guest shut down")
                    return ExitStatus(ERROR_EXIT_CODE, "error", f"vCPU {self.index}: system event {event}")
                case b.KVM_EXIT_INTERNAL_ERROR:
                    return ExitStatus(ERROR_EXIT_CODE, "error", self._describe_internal_error(run.u.internal))
                case b.KVM_EXIT_FAIL_ENTRY:
                    reason = run.u.fail_entry.hardware_entry_failure_reason
                    return ExitStatus(
                        ERROR_EXIT_CODE, "error", f"vCPU {self.index}: KVM could not enter the guest (hardware reason {reason:#x})"
                    )
                case b.KVM_EXIT_HLT:
                    # Only without an in-kernel LAPIC; ours always has one.
                    return ExitStatus(0, "poweroff", f"vCPU {self.index} halted")
                case other:
                    return ExitStatus(ERROR_EXIT_CODE, "error", f"vCPU {self.index}: unexpected KVM exit reason {other}")

    @staticmethod
    def _string_io(target: tuple[BusDevice, int] | None, direction: int, size: int, count: int, data_offset: int, buffer: memoryview) -> None:
        """`rep ins/outs` exits carry `count` items, one after another in the data area."""
        mask = _SIZE_MASK[size]
        for _ in range(count):
            if direction == b.KVM_EXIT_IO_OUT:
                if target is not None:
                    target[0].write(target[1], size, int.from_bytes(buffer[data_offset : data_offset + size], "little"))
            else:
                value = target[0].read(target[1], size) & mask if target is not None else mask
                buffer[data_offset : data_offset + size] = value.to_bytes(size, "little")
            data_offset += size

    def _stop_requested(self, control: "VcpuControl") -> bool:
        """Park while the VM is paused; True when the thread should end."""
        if not control.stopping:
            control.park_if_paused(self)
        return control.stopping

    def _handle_mmio(self, mmio: CData) -> None:
        size = mmio.len
        target = self._mmio_bus.lookup(mmio.phys_addr, size)
        if mmio.is_write:
            if target is not None:
                value = int.from_bytes(ffi.buffer(mmio.data, size), "little")
                target[0].write(target[1], size, value)
        else:
            value = target[0].read(target[1], size) if target is not None else (1 << (8 * size)) - 1
            ffi.memmove(mmio.data, value.to_bytes(size, "little"), size)

    def _describe_internal_error(self, internal: CData) -> str:
        try:
            rip = self.fd.get_regs().rip
            where = f" at RIP {rip:#x}"
        except KvmError:
            where = ""
        if internal.suberror == b.KVM_INTERNAL_ERROR_EMULATION:
            detail = "KVM could not emulate an instruction"
        else:
            detail = f"KVM internal error (suberror {internal.suberror})"
        data = " ".join(f"{internal.data[i]:#x}" for i in range(min(internal.ndata, 16)))
        return f"vCPU {self.index}: {detail}{where}" + (f" [data {data}]" if data else "")
