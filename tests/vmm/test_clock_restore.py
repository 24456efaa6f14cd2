"""The VM clock (kvmclock) after a restore: moved on by the host time that
passed since the save, so a restored or migrated guest reads the current
wall time; states saved without the save time restore the clock as it was."""

from __future__ import annotations

import io
import struct
import time
from pathlib import Path

import pytest

from flat_guest import elf_image, spin
from snapvisor.vmm.builder import VmConfig, build_microvm_for_boot, build_microvm_from_state
from snapvisor.vmm.errors import VmStateError
from snapvisor.vmm.kvm import bindings as b
from snapvisor.vmm.kvm import ffi

pytestmark = pytest.mark.kvm
MiB = 1 << 20
SECOND_NS = 1_000_000_000


def _saved_state(tmp_path: Path) -> dict:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(spin()))
    with build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=16 * MiB, serial_out=io.BytesIO())) as vm:
        vm.start()
        vm.pause()
        return vm.save_state()


def _clock(state: dict):
    clock = ffi.new("struct kvm_clock_data *")
    ffi.memmove(clock, state["irqchip"]["clock"], ffi.sizeof("struct kvm_clock_data"))
    return clock


def _clock_ns(state: dict) -> int:
    return _clock(state).clock


def _saved_earlier(state: dict, seconds: int, with_realtime: bool) -> None:
    """Make `state` one saved `seconds` ago, by a host whose KVM paired the
    clock with realtime (KVM_CLOCK_REALTIME) or not."""
    state["irqchip"]["clock_saved_at_ns"] -= seconds * SECOND_NS
    clock = _clock(state)
    clock.realtime -= seconds * SECOND_NS
    if not with_realtime:
        clock.flags &= ~b.KVM_CLOCK_REALTIME
    state["irqchip"]["clock"] = bytes(ffi.buffer(clock))


def _restored_clock_ns(state: dict) -> int:
    with build_microvm_from_state(state, serial_out=io.BytesIO()) as vm:
        return vm.vm_fd.get_clock().clock


@pytest.mark.parametrize("with_realtime", [True, False], ids=["kvm-realtime", "save-time"])
@pytest.mark.parametrize("stopped_s", [0, 30, 3600])
def test_restored_clock_counts_the_time_the_vm_was_stopped(tmp_path: Path, stopped_s: int, with_realtime: bool) -> None:
    state = _saved_state(tmp_path)
    _saved_earlier(state, stopped_s, with_realtime)
    saved_clock = _clock_ns(state)
    since_save = time.clock_gettime_ns(time.CLOCK_REALTIME) - state["irqchip"]["clock_saved_at_ns"]
    advance = _restored_clock_ns(state) - saved_clock
    assert since_save <= advance <= since_save + SECOND_NS // 2


def test_a_state_without_its_save_time_restores_the_clock_as_saved(tmp_path: Path) -> None:
    state = _saved_state(tmp_path)
    _saved_earlier(state, 0, with_realtime=False)
    del state["irqchip"]["clock_saved_at_ns"]
    assert 0 <= _restored_clock_ns(state) - _clock_ns(state) < SECOND_NS // 2


def test_a_damaged_save_time_is_refused(tmp_path: Path) -> None:
    state = _saved_state(tmp_path)
    state["irqchip"]["clock_saved_at_ns"] = "yesterday"
    with pytest.raises(VmStateError, match="saved clock time"):
        build_microvm_from_state(state, serial_out=io.BytesIO())


PVCLOCK_GPA = 0x5000  # free low memory (docs/architecture.md)
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
PVCLOCK_SYSTEM_TIME, PVCLOCK_FLAGS = 16, 29  # in struct pvclock_vcpu_time_info
PVCLOCK_GUEST_STOPPED = 1 << 1


def _kvmclock_guest() -> bytes:
    """Turn kvmclock on at PVCLOCK_GPA (wrmsr), say so on COM1, spin."""
    wrmsr = (b"\xb9" + MSR_KVM_SYSTEM_TIME_NEW.to_bytes(4, "little") + b"\xb8" + (PVCLOCK_GPA | 1).to_bytes(4, "little")
             + b"\x31\xd2\x0f\x30")
    return wrmsr + b"\x66\xba\xf8\x03\xb0\x0a\xee" + spin()  # out 0x3f8, '\n'


def _wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("with_realtime", [True, False], ids=["kvm-realtime", "save-time"])
def test_a_kvmclock_guest_sees_the_time_it_was_stopped_and_is_told(tmp_path: Path, with_realtime: bool) -> None:
    """What a Linux guest reads: its kvmclock page after a restore of a state saved
    30 s ago is 30 s on, and flagged PVCLOCK_GUEST_STOPPED (KVM_KVMCLOCK_CTRL)."""
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(_kvmclock_guest()))
    out = io.BytesIO()
    with build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=16 * MiB, serial_out=out)) as vm:
        vm.start()
        _wait_for(lambda: out.getvalue() == b"\n")
        vm.pause()
        state = vm.save_state()
        memory = bytes(vm.memory.regions[0].view)
    _saved_earlier(state, 30, with_realtime)
    saved_clock = _clock_ns(state)

    def fill(target) -> None:
        target.regions[0].view[:] = memory

    with build_microvm_from_state(state, serial_out=io.BytesIO(), memory_fill=fill) as restored:
        page = lambda: restored.memory.read(PVCLOCK_GPA, 32)  # noqa: E731
        restored.start()
        _wait_for(lambda: page()[PVCLOCK_FLAGS] & PVCLOCK_GUEST_STOPPED)
        system_time = struct.unpack_from("<Q", page(), PVCLOCK_SYSTEM_TIME)[0]
    assert 30 * SECOND_NS <= system_time - saved_clock <= 31 * SECOND_NS
