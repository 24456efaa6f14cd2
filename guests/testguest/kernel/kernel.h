/* Ring-0 internals. Everything here runs in KVM's instruction emulator on PVM
 * hosts (~0.3 us per instruction, no SSE, no int3/int n): keep it short and plain. */
#ifndef KERNEL_H
#define KERNEL_H

#include "../include/tg.h"

enum boot_kind { BOOT_LINUX64 = 0, BOOT_MULTIBOOT = 1 };

static inline void outb(u16 port, u8 v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 v;

	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" ::: "memory");
}

/* The CPU's index: which KSTACK_SIZE slot of kstacks[] %rsp is in. */
extern u8 kstacks[MAX_CPUS][KSTACK_SIZE];
static inline u32 this_cpu(void)
{
	u64 sp;

	__asm__ volatile("mov %%rsp, %0" : "=r"(sp));
	return (u32)((sp - (u64)kstacks) / KSTACK_SIZE);
}

/* Linker-script symbols (linker.ld). */
extern char __image_end[], __user_start[], __user_end[];

/* Shared with ring 3 (defined in user pages by user/workload.c). */
extern struct tg_params tg_params;
extern volatile u64 tg_ticks;
extern u8 ustacks[MAX_CPUS][USTACK_SIZE];
void user_main(u64 cpu);

/* bootinfo.c: what the boot loader told us, copied before the working set is used */
#define MAX_E820 32
struct mem_range {
	u64 start, end;
};
struct boot_info {
	char cmdline[1024];
	u32 nr_ram;
	struct mem_range ram[MAX_E820];
};
void bootinfo_read(struct boot_info *bi, enum boot_kind kind, u64 info);

/* cmdline.c */
struct kparams {
	u64 mem_mib, seed, rate, rounds, exit_status, cpus, verify, pages, ticks, corrupt;
	u64 disk, disk_blocks, disk_writes, disk_seq, disk_verify, work, net;
};
void cmdline_parse(const char *cmdline, struct kparams *kp);
u64 parse_u64(const char *s);
const char *cmdline_value(const char *cmdline, const char *name);

/* serial.c */
void serial_init(void);
void console_write(const char *buf, u64 len);
void console_write_unlocked(const char *buf, u64 len);

/* desc.c */
void gdt_idt_load(u32 cpu);
void idt_init(void);
void tss_init(u32 cpu);

/* paging.c */
#define MAP_LIMIT (4UL << 30) /* paging.c maps RAM below 4 GiB */
#define LAPIC_PHYS 0xfee00000UL
void paging_init(u64 ram_top);
void paging_map_mmio(u64 phys);
void paging_load(void);

/* virtio_blk.c: one polled virtio-blk disk on virtio-mmio, used by CPU 0 only */
u64 virtio_mmio_base(const char *cmdline);
u64 disk_init(u64 base);
u64 disk_io(u64 write, u64 sector, u64 sectors, u64 buf);

/* virtio_net.c: answers ARP and ICMP echo for tg.ip, polled from the BSP's timer tick */
extern volatile u8 net_up;
int net_init(const char *cmdline);
void net_poll(void);

/* lib.c */
void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);

/* timer.c */
extern u64 tick_line_every;
void pic_pit_init(u64 tick_line_every);
void lapic_wake_init(void);
void wait_until(u32 cpu, u64 until);

/* power.c */
extern u8 exit_status; /* tg.exit, for the last CPU to finish */
__attribute__((noreturn)) void power_off(u8 status);
__attribute__((noreturn)) void idle_forever(void);

/* entry64.S */
__attribute__((noreturn)) void enter_user(u64 rip, u64 rsp, u64 arg);
extern u64 isr_table[64];
extern volatile u64 tick_countdown;

/* trap.c */
struct trap_frame {
	u64 r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};
void trap(struct trap_frame *f);
void tick_line(void);
void irq0_work(void);

#endif
