"""The vCPU fd: one thin method per vCPU ioctl, plus its mmapped `struct kvm_run`."""

from __future__ import annotations

import mmap
from functools import partial
from typing import Callable

from snapvisor.vmm.errors import KvmError
from snapvisor.vmm.kvm import bindings as b
from snapvisor.vmm.kvm.bindings import CData, ffi, libc
from snapvisor.vmm.kvm.fd import KvmFd

_ioctl = libc.ioctl
_NO_ARG = ffi.cast("unsigned long", 0)


class VcpuFd(KvmFd):
    def __init__(self, fd: int, run_mmap_size: int) -> None:
        super().__init__(fd)
        self._run_mmap = mmap.mmap(fd, run_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # Both views alias the shared page: `run` for named fields, `run_buffer`
        # for the run loop's direct reads at fixed offsets and for PIO data.
        self.run_buffer = memoryview(self._run_mmap)
        self.run = ffi.from_buffer("struct kvm_run *", self._run_mmap)

    def close(self) -> None:
        if self.closed:
            return
        self.run = None
        self.run_buffer.release()
        self._run_mmap.close()
        super().close()

    def run_call(self) -> Callable[[], int]:
        """KVM_RUN as a zero-argument callable returning the raw result (0, or -1
        with the error in `ffi.errno`): the run loop's hot path, without a Python
        frame or an exception per exit."""
        return partial(_ioctl, self._fd, b.KVM_RUN, _NO_ARG)

    def run_once(self) -> None:
        """KVM_RUN. Raises KvmError (errno EINTR when a signal or immediate_exit stopped it)."""
        if _ioctl(self._fd, b.KVM_RUN, _NO_ARG) < 0:
            raise KvmError("KVM_RUN", ffi.errno)

    def set_signal_mask(self, sigset: bytes) -> None:
        """The blocked-signal mask in force while this vCPU is inside KVM_RUN
        (`sigset`: the kernel's sigset_t, bit n-1 for signal n)."""
        mask = ffi.new("struct kvm_signal_mask *", {"len": len(sigset), "sigset": len(sigset)})
        ffi.memmove(mask.sigset, sigset, len(sigset))
        self._ioctl("KVM_SET_SIGNAL_MASK", b.KVM_SET_SIGNAL_MASK, mask)

    def get_regs(self) -> CData:
        regs = ffi.new("struct kvm_regs *")
        self._ioctl("KVM_GET_REGS", b.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: CData) -> None:
        self._ioctl("KVM_SET_REGS", b.KVM_SET_REGS, regs)

    def get_sregs(self) -> CData:
        sregs = ffi.new("struct kvm_sregs *")
        self._ioctl("KVM_GET_SREGS", b.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: CData) -> None:
        self._ioctl("KVM_SET_SREGS", b.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> CData:
        fpu = ffi.new("struct kvm_fpu *")
        self._ioctl("KVM_GET_FPU", b.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: CData) -> None:
        self._ioctl("KVM_SET_FPU", b.KVM_SET_FPU, fpu)

    def get_msrs(self, msrs: CData) -> int:
        """Reads the MSRs whose indices are in `msrs` (struct kvm_msrs *); returns how many were read."""
        return self._ioctl("KVM_GET_MSRS", b.KVM_GET_MSRS, msrs)

    def set_msrs(self, msrs: CData) -> int:
        """Writes `msrs`; returns how many were written (the kernel stops at the first refused one)."""
        return self._ioctl("KVM_SET_MSRS", b.KVM_SET_MSRS, msrs)

    def set_cpuid2(self, cpuid: CData) -> None:
        self._ioctl("KVM_SET_CPUID2", b.KVM_SET_CPUID2, cpuid)

    def get_cpuid2(self, max_entries: int) -> CData:
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
        self._ioctl("KVM_GET_CPUID2", b.KVM_GET_CPUID2, cpuid)
        return cpuid

    def get_lapic(self) -> CData:
        lapic = ffi.new("struct kvm_lapic_state *")
        self._ioctl("KVM_GET_LAPIC", b.KVM_GET_LAPIC, lapic)
        return lapic

    def set_lapic(self, lapic: CData) -> None:
        self._ioctl("KVM_SET_LAPIC", b.KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> CData:
        state = ffi.new("struct kvm_mp_state *")
        self._ioctl("KVM_GET_MP_STATE", b.KVM_GET_MP_STATE, state)
        return state

    def set_mp_state(self, state: CData) -> None:
        self._ioctl("KVM_SET_MP_STATE", b.KVM_SET_MP_STATE, state)

    def kvmclock_ctrl(self) -> None:
        self._ioctl("KVM_KVMCLOCK_CTRL", b.KVM_KVMCLOCK_CTRL)

    def get_vcpu_events(self) -> CData:
        events = ffi.new("struct kvm_vcpu_events *")
        self._ioctl("KVM_GET_VCPU_EVENTS", b.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: CData) -> None:
        self._ioctl("KVM_SET_VCPU_EVENTS", b.KVM_SET_VCPU_EVENTS, events)

    def get_debugregs(self) -> CData:
        debugregs = ffi.new("struct kvm_debugregs *")
        self._ioctl("KVM_GET_DEBUGREGS", b.KVM_GET_DEBUGREGS, debugregs)
        return debugregs

    def set_debugregs(self, debugregs: CData) -> None:
        self._ioctl("KVM_SET_DEBUGREGS", b.KVM_SET_DEBUGREGS, debugregs)

    def get_xsave(self) -> CData:
        xsave = ffi.new("struct kvm_xsave *")
        self._ioctl("KVM_GET_XSAVE", b.KVM_GET_XSAVE, xsave)
        return xsave

    def get_xsave2(self, size: int) -> CData:
        """KVM_GET_XSAVE2 into a buffer of `size` bytes (KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2))."""
        extra_words = max(0, (size - ffi.sizeof("struct kvm_xsave")) // 4)
        xsave = ffi.new("struct kvm_xsave *", {"extra": extra_words})
        self._ioctl("KVM_GET_XSAVE2", b.KVM_GET_XSAVE2, xsave)
        return xsave

    def set_xsave(self, xsave: CData) -> None:
        self._ioctl("KVM_SET_XSAVE", b.KVM_SET_XSAVE, xsave)

    def get_xcrs(self) -> CData:
        xcrs = ffi.new("struct kvm_xcrs *")
        self._ioctl("KVM_GET_XCRS", b.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: CData) -> None:
        self._ioctl("KVM_SET_XCRS", b.KVM_SET_XCRS, xcrs)
