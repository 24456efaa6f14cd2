"""The VM fd: one thin method per VM ioctl."""

from __future__ import annotations

from snapvisor.vmm.kvm import bindings as b
from snapvisor.vmm.kvm.bindings import CData, ffi
from snapvisor.vmm.kvm.fd import KvmFd
from snapvisor.vmm.kvm.vcpu import VcpuFd


class VmFd(KvmFd):
    def check_extension(self, cap: int) -> int:
        return self._ioctl("KVM_CHECK_EXTENSION", b.KVM_CHECK_EXTENSION, cap)

    def create_vcpu(self, vcpu_id: int, run_mmap_size: int) -> VcpuFd:
        fd = self._ioctl("KVM_CREATE_VCPU", b.KVM_CREATE_VCPU, vcpu_id)
        return VcpuFd(fd, run_mmap_size)

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": slot,
                "flags": flags,
                "guest_phys_addr": guest_phys_addr,
                "memory_size": memory_size,
                "userspace_addr": userspace_addr,
            },
        )
        self._ioctl("KVM_SET_USER_MEMORY_REGION", b.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, address: int) -> None:
        self._ioctl("KVM_SET_TSS_ADDR", b.KVM_SET_TSS_ADDR, address)

    def set_identity_map_addr(self, address: int) -> None:
        self._ioctl(
            "KVM_SET_IDENTITY_MAP_ADDR", b.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", address)
        )

    def create_irqchip(self) -> None:
        self._ioctl("KVM_CREATE_IRQCHIP", b.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int) -> None:
        self._ioctl("KVM_CREATE_PIT2", b.KVM_CREATE_PIT2, ffi.new("struct kvm_pit_config *", {"flags": flags}))

    def irq_line(self, irq: int, level: int) -> None:
        self._ioctl(
            "KVM_IRQ_LINE", b.KVM_IRQ_LINE, ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level})
        )

    def get_irqchip(self, chip_id: int) -> CData:
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        self._ioctl("KVM_GET_IRQCHIP", b.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: CData) -> None:
        self._ioctl("KVM_SET_IRQCHIP", b.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> CData:
        pit = ffi.new("struct kvm_pit_state2 *")
        self._ioctl("KVM_GET_PIT2", b.KVM_GET_PIT2, pit)
        return pit

    def set_pit2(self, pit: CData) -> None:
        self._ioctl("KVM_SET_PIT2", b.KVM_SET_PIT2, pit)

    def get_clock(self) -> CData:
        clock = ffi.new("struct kvm_clock_data *")
        self._ioctl("KVM_GET_CLOCK", b.KVM_GET_CLOCK, clock)
        return clock

    def set_clock(self, clock: CData) -> None:
        self._ioctl("KVM_SET_CLOCK", b.KVM_SET_CLOCK, clock)

    def enable_cap(self, cap: int, *args: int) -> None:
        enable = ffi.new("struct kvm_enable_cap *", {"cap": cap, "args": list(args)})
        self._ioctl("KVM_ENABLE_CAP", b.KVM_ENABLE_CAP, enable)

    def get_dirty_log(self, slot: int, bitmap: CData) -> None:
        """Fills `bitmap` (a cdata pointer to at least ceil(pages/64) u64) for `slot`."""
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot, "dirty_bitmap": bitmap})
        self._ioctl("KVM_GET_DIRTY_LOG", b.KVM_GET_DIRTY_LOG, log)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: CData) -> None:
        log = ffi.new(
            "struct kvm_clear_dirty_log *",
            {"slot": slot, "first_page": first_page, "num_pages": num_pages, "dirty_bitmap": bitmap},
        )
        self._ioctl("KVM_CLEAR_DIRTY_LOG", b.KVM_CLEAR_DIRTY_LOG, log)
