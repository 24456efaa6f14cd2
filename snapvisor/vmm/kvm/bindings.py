"""cffi declarations of the x86_64 `linux/kvm.h` structs the VMM uses, and the
ioctl request numbers computed from their sizes (the `_IOC` encoding).

This module and its siblings are the only code that knows the KVM ABI.
"""

from __future__ import annotations

from typing import Any

from cffi import FFI

ffi = FFI()
# cffi's cdata objects have no static type; this alias marks where one is passed.
CData = Any
ffi.cdef(
    """
    int ioctl(int fd, unsigned long request, ...);

    struct kvm_userspace_memory_region {
        uint32_t slot;
        uint32_t flags;
        uint64_t guest_phys_addr;
        uint64_t memory_size;
        uint64_t userspace_addr;
    };

    struct kvm_regs {
        uint64_t rax, rbx, rcx, rdx;
        uint64_t rsi, rdi, rsp, rbp;
        uint64_t r8, r9, r10, r11;
        uint64_t r12, r13, r14, r15;
        uint64_t rip, rflags;
    };

    struct kvm_segment {
        uint64_t base;
        uint32_t limit;
        uint16_t selector;
        uint8_t type;
        uint8_t present, dpl, db, s, l, g, avl;
        uint8_t unusable;
        uint8_t padding;
    };

    struct kvm_dtable {
        uint64_t base;
        uint16_t limit;
        uint16_t padding[3];
    };

    struct kvm_sregs {
        struct kvm_segment cs, ds, es, fs, gs, ss;
        struct kvm_segment tr, ldt;
        struct kvm_dtable gdt, idt;
        uint64_t cr0, cr2, cr3, cr4, cr8;
        uint64_t efer;
        uint64_t apic_base;
        uint64_t interrupt_bitmap[4];
    };

    struct kvm_fpu {
        uint8_t fpr[8][16];
        uint16_t fcw;
        uint16_t fsw;
        uint8_t ftwx;
        uint8_t pad1;
        uint16_t last_opcode;
        uint64_t last_ip;
        uint64_t last_dp;
        uint8_t xmm[16][16];
        uint32_t mxcsr;
        uint32_t pad2;
    };

    struct kvm_msr_entry {
        uint32_t index;
        uint32_t reserved;
        uint64_t data;
    };

    struct kvm_msrs {
        uint32_t nmsrs;
        uint32_t pad;
        struct kvm_msr_entry entries[];
    };

    struct kvm_msr_list {
        uint32_t nmsrs;
        uint32_t indices[];
    };

    struct kvm_cpuid_entry2 {
        uint32_t function;
        uint32_t index;
        uint32_t flags;
        uint32_t eax;
        uint32_t ebx;
        uint32_t ecx;
        uint32_t edx;
        uint32_t padding[3];
    };

    struct kvm_cpuid2 {
        uint32_t nent;
        uint32_t padding;
        struct kvm_cpuid_entry2 entries[];
    };

    struct kvm_lapic_state {
        char regs[1024];
    };

    struct kvm_xsave {
        uint32_t region[1024];
        uint32_t extra[];
    };

    struct kvm_xcr {
        uint32_t xcr;
        uint32_t reserved;
        uint64_t value;
    };

    struct kvm_xcrs {
        uint32_t nr_xcrs;
        uint32_t flags;
        struct kvm_xcr xcrs[16];
        uint64_t padding[16];
    };

    struct kvm_vcpu_events {
        struct {
            uint8_t injected;
            uint8_t nr;
            uint8_t has_error_code;
            uint8_t pending;
            uint32_t error_code;
        } exception;
        struct {
            uint8_t injected;
            uint8_t nr;
            uint8_t soft;
            uint8_t shadow;
        } interrupt;
        struct {
            uint8_t injected;
            uint8_t pending;
            uint8_t masked;
            uint8_t pad;
        } nmi;
        uint32_t sipi_vector;
        uint32_t flags;
        struct {
            uint8_t smm;
            uint8_t pending;
            uint8_t smm_inside_nmi;
            uint8_t latched_init;
        } smi;
        uint8_t reserved[27];
        uint8_t exception_has_payload;
        uint64_t exception_payload;
    };

    struct kvm_debugregs {
        uint64_t db[4];
        uint64_t dr6;
        uint64_t dr7;
        uint64_t flags;
        uint64_t reserved[9];
    };

    struct kvm_mp_state {
        uint32_t mp_state;
    };

    struct kvm_irqchip {
        uint32_t chip_id;
        uint32_t pad;
        char chip[512];   /* union of kvm_pic_state / kvm_ioapic_state, kept opaque */
    };

    struct kvm_pit_channel_state {
        uint32_t count;
        uint16_t latched_count;
        uint8_t count_latched;
        uint8_t status_latched;
        uint8_t status;
        uint8_t read_state;
        uint8_t write_state;
        uint8_t write_latch;
        uint8_t rw_mode;
        uint8_t mode;
        uint8_t bcd;
        uint8_t gate;
        int64_t count_load_time;
    };

    struct kvm_pit_state2 {
        struct kvm_pit_channel_state channels[3];
        uint32_t flags;
        uint32_t reserved[9];
    };

    struct kvm_pit_config {
        uint32_t flags;
        uint32_t pad[15];
    };

    struct kvm_clock_data {
        uint64_t clock;
        uint32_t flags;
        uint32_t pad0;
        uint64_t realtime;
        uint64_t host_tsc;
        uint32_t pad[4];
    };

    struct kvm_irq_level {
        uint32_t irq;      /* union with int32_t status */
        uint32_t level;
    };

    struct kvm_dirty_log {
        uint32_t slot;
        uint32_t padding1;
        void *dirty_bitmap;  /* union with uint64_t padding2 */
    };

    struct kvm_clear_dirty_log {
        uint32_t slot;
        uint32_t num_pages;
        uint64_t first_page;
        void *dirty_bitmap;  /* union with uint64_t padding2 */
    };

    struct kvm_signal_mask {
        uint32_t len;
        uint8_t sigset[];
    };

    struct kvm_enable_cap {
        uint32_t cap;
        uint32_t flags;
        uint64_t args[4];
        uint8_t pad[64];
    };

    struct kvm_run_io {
        uint8_t direction;
        uint8_t size;
        uint16_t port;
        uint32_t count;
        uint64_t data_offset;
    };

    struct kvm_run_mmio {
        uint64_t phys_addr;
        uint8_t data[8];
        uint32_t len;
        uint8_t is_write;
    };

    struct kvm_run_internal {
        uint32_t suberror;
        uint32_t ndata;
        uint64_t data[16];
    };

    struct kvm_run_system_event {
        uint32_t type;
        uint32_t ndata;
        uint64_t data[16];
    };

    struct kvm_run_fail_entry {
        uint64_t hardware_entry_failure_reason;
        uint32_t cpu;
    };

    /* The head of struct kvm_run: everything up to and including the 256-byte
       exit union. The kernel's struct continues (sync regs) but the VMM never
       reads past the union. */
    struct kvm_run {
        uint8_t request_interrupt_window;
        uint8_t immediate_exit;
        uint8_t padding1[6];
        uint32_t exit_reason;
        uint8_t ready_for_interrupt_injection;
        uint8_t if_flag;
        uint16_t flags;
        uint64_t cr8;
        uint64_t apic_base;
        union {
            struct kvm_run_io io;
            struct kvm_run_mmio mmio;
            struct kvm_run_internal internal;
            struct kvm_run_system_event system_event;
            struct kvm_run_fail_entry fail_entry;
            uint64_t hardware_exit_reason;
            char padding[256];
        } u;
    };
    """
)

libc = ffi.dlopen(None)

# --- ioctl request encoding (include/uapi/asm-generic/ioctl.h) -------------
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ, nr, ffi.sizeof(ctype))


def _iow(nr: int, ctype: str) -> int:
    return _ioc(_IOC_WRITE, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ffi.sizeof(ctype))


# system ioctls
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, "struct kvm_msr_list")
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")

# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, "struct kvm_dirty_log")
KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "uint64_t")
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, "struct kvm_irq_level")
KVM_GET_IRQCHIP = _iowr(0x62, "struct kvm_irqchip")
KVM_SET_IRQCHIP = _ior(0x63, "struct kvm_irqchip")
KVM_CREATE_PIT2 = _iow(0x77, "struct kvm_pit_config")
KVM_SET_CLOCK = _iow(0x7B, "struct kvm_clock_data")
KVM_GET_CLOCK = _ior(0x7C, "struct kvm_clock_data")
KVM_GET_PIT2 = _ior(0x9F, "struct kvm_pit_state2")
KVM_SET_PIT2 = _iow(0xA0, "struct kvm_pit_state2")
KVM_ENABLE_CAP = _iow(0xA3, "struct kvm_enable_cap")
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, "struct kvm_clear_dirty_log")

# vCPU ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
KVM_SET_SIGNAL_MASK = _iow(0x8B, "struct kvm_signal_mask")
KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
KVM_GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _iow(0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
KVM_KVMCLOCK_CTRL = _io(0xAD)
KVM_GET_CPUID2 = _iowr(0x91, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
KVM_GET_VCPU_EVENTS = _ior(0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _iow(0xA0, "struct kvm_vcpu_events")
KVM_GET_DEBUGREGS = _ior(0xA1, "struct kvm_debugregs")
KVM_SET_DEBUGREGS = _iow(0xA2, "struct kvm_debugregs")
KVM_GET_XSAVE = _ior(0xA4, "struct kvm_xsave")
KVM_SET_XSAVE = _iow(0xA5, "struct kvm_xsave")
KVM_GET_XCRS = _ior(0xA6, "struct kvm_xcrs")
KVM_SET_XCRS = _iow(0xA7, "struct kvm_xcrs")
KVM_GET_XSAVE2 = _ior(0xCF, "struct kvm_xsave")

# capabilities (KVM_CHECK_EXTENSION arguments)
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT2 = 33
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_DEBUGREGS = 50
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_XSAVE2 = 208

KVM_API_VERSION = 12

# memslot flags
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0

# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 arguments
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0

# irqchip ids for KVM_GET/SET_IRQCHIP
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

KVM_PIT_SPEAKER_DUMMY = 1

# mp_state values
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

# exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_INTERNAL_ERROR_EMULATION = 1

# KVM_CLOCK_* flags in kvm_clock_data
KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

# Byte offsets into struct kvm_run for the run loop's direct reads.
RUN_IMMEDIATE_EXIT_OFFSET = ffi.offsetof("struct kvm_run", "immediate_exit")
RUN_EXIT_REASON_OFFSET = ffi.offsetof("struct kvm_run", "exit_reason")
RUN_EXIT_UNION_OFFSET = ffi.offsetof("struct kvm_run", "u")
