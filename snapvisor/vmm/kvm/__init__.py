"""The KVM binding layer: the only code that knows ioctl numbers and `linux/kvm.h`.

rust-vmm's kvm-ioctls is the model: a system object (`Kvm`), a VM object
(`VmFd`) and a vCPU object (`VcpuFd`), each with one thin method per ioctl and no
policy; failures raise `KvmError` carrying the ioctl name and the errno name.
"""

from snapvisor.vmm.errors import KvmError, KvmUnavailableError
from snapvisor.vmm.kvm.bindings import ffi
from snapvisor.vmm.kvm.system import Kvm
from snapvisor.vmm.kvm.vcpu import VcpuFd
from snapvisor.vmm.kvm.vm import VmFd

__all__ = ["Kvm", "VmFd", "VcpuFd", "KvmError", "KvmUnavailableError", "ffi"]
