"""The /dev/kvm system object: one thin method per system ioctl."""

from __future__ import annotations

import os

from snapvisor.vmm.errors import KvmError, KvmUnavailableError
from snapvisor.vmm.kvm import bindings as b
from snapvisor.vmm.kvm.bindings import CData, ffi
from snapvisor.vmm.kvm.fd import KvmFd
from snapvisor.vmm.kvm.vm import VmFd

DEFAULT_KVM_PATH = "/dev/kvm"

# Large enough for every leaf a current x86 KVM reports (it returns E2BIG otherwise).
MAX_CPUID_ENTRIES = 256
MAX_MSR_INDICES = 1024


class Kvm(KvmFd):
    """The KVM system fd."""

    @classmethod
    def open(cls, path: str = DEFAULT_KVM_PATH) -> "Kvm":
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path} does not exist: this host has no KVM (load the kvm module, "
                "or enable nested virtualisation for this VM)"
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"{path} is not accessible to this user: add the user to the group "
                f"that owns {path} (usually 'kvm') or run as root"
            ) from None
        except OSError as exc:
            raise KvmUnavailableError(f"cannot open {path}: {exc.strerror}") from None
        kvm = cls(fd)
        try:
            version = kvm.get_api_version()
        except KvmError as exc:
            kvm.close()
            raise KvmUnavailableError(f"{path} is not a KVM device ({exc})") from None
        if version != b.KVM_API_VERSION:
            kvm.close()
            raise KvmUnavailableError(
                f"{path} speaks KVM API version {version}, snapvisor needs {b.KVM_API_VERSION}"
            )
        return kvm

    def get_api_version(self) -> int:
        return self._ioctl("KVM_GET_API_VERSION", b.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        return self._ioctl("KVM_CHECK_EXTENSION", b.KVM_CHECK_EXTENSION, cap)

    def get_vcpu_mmap_size(self) -> int:
        return self._ioctl("KVM_GET_VCPU_MMAP_SIZE", b.KVM_GET_VCPU_MMAP_SIZE)

    def create_vm(self) -> VmFd:
        return VmFd(self._ioctl("KVM_CREATE_VM", b.KVM_CREATE_VM, 0))

    def get_supported_cpuid(self, max_entries: int = MAX_CPUID_ENTRIES) -> CData:
        """Returns an owning `struct kvm_cpuid2 *` with `nent` filled in."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
        self._ioctl("KVM_GET_SUPPORTED_CPUID", b.KVM_GET_SUPPORTED_CPUID, cpuid)
        return cpuid

    def get_msr_index_list(self, max_entries: int = MAX_MSR_INDICES) -> list[int]:
        msr_list = ffi.new("struct kvm_msr_list *", {"nmsrs": max_entries, "indices": max_entries})
        self._ioctl("KVM_GET_MSR_INDEX_LIST", b.KVM_GET_MSR_INDEX_LIST, msr_list)
        return list(msr_list.indices[0 : msr_list.nmsrs])
