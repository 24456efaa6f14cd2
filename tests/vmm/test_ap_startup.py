"""Application processors for a kernel that starts them itself (Linux): in
their reset state, waiting for INIT/SIPI from the BSP, and still so after a
save and a restore. (The INIT/SIPI start itself needs real-mode code, which
this PVM host cannot run: the nested lab boots Linux on 2 vCPUs.)"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from flat_guest import elf_image, snapvisor_note, spin
from test_vm_pause_restore import copy_memory_from
from snapvisor.vmm.builder import VmConfig, build_microvm_for_boot, build_microvm_from_state
from snapvisor.vmm.kvm import bindings as b

pytestmark = pytest.mark.kvm
MiB = 1 << 20
RESET_CS, RESET_RIP = 0xF000, 0xFFF0  # where an x86 CPU comes out of reset


def _ap_state(vm) -> tuple[int, int, int]:
    ap = vm.vcpus[1].fd
    return ap.get_mp_state().mp_state, ap.get_sregs().cs.selector, ap.get_regs().rip


def test_aps_wait_for_sipi_in_their_reset_state_and_round_trip(tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(spin()))
    with build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=16 * MiB, vcpus=2, serial_out=io.BytesIO())) as vm:
        assert vm.vcpus[0].fd.get_mp_state().mp_state == b.KVM_MP_STATE_RUNNABLE
        assert _ap_state(vm) == (b.KVM_MP_STATE_UNINITIALIZED, RESET_CS, RESET_RIP)
        vm.start()
        vm.pause()
        state = vm.save_state()
        assert state["vcpus"][1]["mp_state"] == b.KVM_MP_STATE_UNINITIALIZED
        with build_microvm_from_state(state, serial_out=io.BytesIO(), memory_fill=copy_memory_from(vm.memory)) as restored:
            assert _ap_state(restored) == (b.KVM_MP_STATE_UNINITIALIZED, RESET_CS, RESET_RIP)
            restored.start()
            restored.pause()
            assert restored.save_state()["vcpus"][1]["mp_state"] == b.KVM_MP_STATE_UNINITIALIZED


def test_the_snapvisor_note_puts_every_vcpu_at_the_entry(tmp_path: Path) -> None:
    """The test guest's own SMP path: no INIT/SIPI, every vCPU runnable at the ELF entry."""
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(spin(), snapvisor_note()))
    with build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=16 * MiB, vcpus=2, serial_out=io.BytesIO())) as vm:
        entry = vm.vcpus[0].fd.get_regs().rip
        assert [(v.fd.get_mp_state().mp_state, v.fd.get_regs().rip) for v in vm.vcpus] == [(b.KVM_MP_STATE_RUNNABLE, entry)] * 2
