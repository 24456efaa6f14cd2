"""The KVM binding layer: struct sizes and ioctl numbers, error reporting."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from snapvisor.vmm.errors import KvmError, KvmUnavailableError
from snapvisor.vmm.kvm import Kvm, ffi
from snapvisor.vmm.kvm import bindings as b

# x86_64 sizes from linux/kvm.h (stable ABI).
PINNED_SIZES = {
    "struct kvm_regs": 144,
    "struct kvm_segment": 24,
    "struct kvm_dtable": 16,
    "struct kvm_sregs": 312,
    "struct kvm_fpu": 416,
    "struct kvm_msr_entry": 16,
    "struct kvm_msrs": 8,
    "struct kvm_msr_list": 4,
    "struct kvm_cpuid_entry2": 40,
    "struct kvm_cpuid2": 8,
    "struct kvm_lapic_state": 1024,
    "struct kvm_xsave": 4096,
    "struct kvm_xcrs": 392,
    "struct kvm_vcpu_events": 64,
    "struct kvm_debugregs": 128,
    "struct kvm_mp_state": 4,
    "struct kvm_irqchip": 520,
    "struct kvm_pit_state2": 112,
    "struct kvm_pit_config": 64,
    "struct kvm_clock_data": 48,
    "struct kvm_irq_level": 8,
    "struct kvm_dirty_log": 16,
    "struct kvm_clear_dirty_log": 24,
    "struct kvm_enable_cap": 104,
    "struct kvm_userspace_memory_region": 32,
}

PINNED_IOCTLS = {
    "KVM_CREATE_VM": 0xAE01,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
    "KVM_GET_XSAVE2": 0x9000AECF,
    "KVM_GET_IRQCHIP": 0xC208AE62,
    "KVM_SET_IRQCHIP": 0x8208AE63,
    "KVM_GET_PIT2": 0x8070AE9F,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
}

HEADER = Path("/usr/include/linux/kvm.h")


@pytest.mark.parametrize("ctype,size", sorted(PINNED_SIZES.items()))
def test_struct_sizes_are_pinned(ctype: str, size: int) -> None:
    assert ffi.sizeof(ctype) == size


@pytest.mark.parametrize("name,number", sorted(PINNED_IOCTLS.items()))
def test_ioctl_numbers_are_pinned(name: str, number: int) -> None:
    assert getattr(b, name) == number


def test_kvm_run_exit_union_offsets() -> None:
    assert b.RUN_EXIT_REASON_OFFSET == 8
    assert b.RUN_EXIT_UNION_OFFSET == 32
    assert ffi.sizeof("struct kvm_run") == 32 + 256


def test_against_installed_kernel_headers(tmp_path: Path) -> None:
    """Every struct and ioctl the binding declares, compared with the C compiler's
    view of linux/kvm.h (linux-libc-dev)."""
    if not HEADER.exists() or shutil.which("gcc") is None:
        pytest.skip("needs gcc and linux/kvm.h (Debian: apt-get install gcc linux-libc-dev)")
    ioctls = sorted(name for name in dir(b) if name.startswith("KVM_") and name.isupper() and _is_ioctl(name))
    lines = [f'printf("S {c} %zu\\n", sizeof({c}));' for c in PINNED_SIZES]
    lines += [f'printf("I {n} %lu\\n", (unsigned long)({n}));' for n in ioctls]
    lines += ['printf("O exit_reason %zu\\n", offsetof(struct kvm_run, exit_reason));']
    lines += ['printf("O u %zu\\n", offsetof(struct kvm_run, io));']
    source = tmp_path / "probe.c"
    source.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\nint main(void){\n"
        + "\n".join(lines)
        + "\nreturn 0;}\n"
    )
    subprocess.run(["gcc", "-o", str(tmp_path / "probe"), str(source)], check=True)
    output = subprocess.run([str(tmp_path / "probe")], check=True, capture_output=True, text=True).stdout
    checked = 0
    for line in output.splitlines():
        kind, *fields = line.split()
        value = int(fields[-1])
        if kind == "S":
            ctype = " ".join(fields[:-1])
            assert ffi.sizeof(ctype) == value, ctype
        elif kind == "I":
            assert getattr(b, fields[0]) == value, fields[0]
        else:
            assert ffi.offsetof("struct kvm_run", fields[0]) == value, fields[0]
        checked += 1
    assert checked == len(PINNED_SIZES) + len(ioctls) + 2
    assert len(ioctls) > 40


def _is_ioctl(name: str) -> bool:
    # ioctl request numbers carry KVMIO (0xAE) in bits 8-15; capabilities and flags do not.
    value = getattr(b, name)
    return isinstance(value, int) and (value >> 8) & 0xFF == b.KVMIO and value > 0xFF


def test_missing_device_gives_one_clear_message(tmp_path: Path) -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist: this host has no KVM"):
        Kvm.open(str(tmp_path / "kvm"))


def test_a_file_that_is_not_kvm_is_refused() -> None:
    with pytest.raises(KvmUnavailableError, match="/dev/null is not a KVM device"):
        Kvm.open("/dev/null")


@pytest.mark.kvm
def test_system_ioctls(kvm: Kvm) -> None:
    assert kvm.get_api_version() == 12
    assert kvm.check_extension(b.KVM_CAP_IRQCHIP) > 0
    assert kvm.check_extension(b.KVM_CAP_NR_VCPUS) >= 1
    assert kvm.get_vcpu_mmap_size() >= 4096
    cpuid = kvm.get_supported_cpuid()
    functions = {cpuid.entries[i].function for i in range(cpuid.nent)}
    assert {0, 1} <= functions
    assert 0x10 in kvm.get_msr_index_list()  # IA32_TIME_STAMP_COUNTER


@pytest.mark.kvm
def test_errors_carry_the_ioctl_and_errno_names(kvm: Kvm) -> None:
    with kvm.create_vm() as vm_fd:
        with pytest.raises(KvmError) as info:
            # A memslot whose size is not page aligned is refused with EINVAL.
            vm_fd.set_user_memory_region(0, 0, 0, 123, 0)
    error = info.value
    assert error.ioctl == "KVM_SET_USER_MEMORY_REGION"
    assert error.errno_name == "EINVAL"
    assert str(error).startswith("KVM_SET_USER_MEMORY_REGION failed: EINVAL (Invalid argument)")


@pytest.mark.kvm
def test_vcpu_register_round_trip(kvm: Kvm) -> None:
    with kvm.create_vm() as vm_fd:
        vm_fd.create_irqchip()
        vcpu = vm_fd.create_vcpu(0, kvm.get_vcpu_mmap_size())
        try:
            regs = vcpu.get_regs()
            regs.rax, regs.rip = 0x1234, 0xFFF0
            vcpu.set_regs(regs)
            again = vcpu.get_regs()
            assert (again.rax, again.rip) == (0x1234, 0xFFF0)
            assert vcpu.get_mp_state().mp_state == b.KVM_MP_STATE_RUNNABLE  # vCPU 0 is the BSP
        finally:
            vcpu.close()
