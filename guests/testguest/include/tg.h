/* Definitions shared by the ring-0 kernel and the ring-3 workload of the test guest.
 * Only types, constants and the layout of the parameter block live here: the two
 * halves share data through user pages, never code. */
#ifndef TG_H
#define TG_H

#ifndef __ASSEMBLER__
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
#endif

#define PAGE_SIZE 4096UL
#define MAX_CPUS 8
#define KSTACK_SIZE 16384UL /* kstacks[] slots: the kernel finds its CPU from %rsp */
#define USTACK_SIZE 16384UL

/* Segment selectors of the kernel's GDT (see kernel/desc.c). */
#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA 0x1b /* index 3, RPL 3 */
#define SEL_UCODE 0x23 /* index 4, RPL 3 */
#define SEL_TSS0 0x28  /* 16-byte TSS descriptors follow, one per CPU */

/* Ring 3 enters the kernel with int3: %rax = number, %rdi/%rsi = arguments. */
#define SYS_WRITE 1  /* (buf, len): print to the serial console, whole lines */
#define SYS_WAIT 2   /* (tick): sleep until tg_ticks reaches tick */
#define SYS_FAIL 3   /* (buf, len): print the line, power off with status 3 */
#define SYS_FINISH 4 /* (): this CPU is done; the last one prints "done" and powers off */
#define SYS_DISK 5   /* (write, sector, sectors, buf): one virtio-blk request; returns its status */

/* virtio-blk request status as SYS_DISK returns it; DISK_S_NODEV when there is no usable disk. */
#define DISK_S_OK 0
#define DISK_S_NODEV 0xff
#define SECTORS_PER_BLOCK 8 /* the workload's disk blocks are 4 KiB pages */
#define MAX_DISK_BLOCKS 16384 /* tg.diskblocks limit: 64 MiB */

#define EXIT_VERIFY_FAIL 3
#define EXIT_FAULT 4
#define EXIT_CONFIG 5 /* tg.mem does not fit, or fewer CPUs than tg.cpus */

/* Parameters and the working-set geometry, written by the kernel before any CPU
 * enters ring 3 and only read afterwards. Lives in a user page. */
#ifndef __ASSEMBLER__
struct tg_params {
	u64 seed;
	u64 rate_mib;      /* per-CPU re-dirty rate in MiB/s, 0 = unlimited */
	u64 rounds;        /* 0 = forever */
	u64 pages;         /* pages re-dirtied per round per CPU, 0 = all owned */
	u64 verify_every;  /* verify all owned pages every n rounds */
	u64 corrupt_round; /* self-test: CPU 0 corrupts a word in this round, 0 = never */
	u64 total_pages;   /* working-set pages, all CPUs together */
	u32 *seq;          /* per-page sequence numbers, total_pages entries */
	u8 *base;          /* first working-set page */
	u32 cpus;
	u64 disk_blocks;   /* disk workload: 4 KiB blocks used, 0 = no disk workload */
	u64 disk_writes;   /* blocks written per round */
	u64 disk_seq;      /* 1: write blocks in order, round after round; 0: pseudo-random */
	u64 disk_verify;   /* read back and check the disk every n rounds */
	u64 work;          /* integer mixing steps before each page write, 0 = none */
};

/* Ring 3 only (the kernel has its own extern in kernel.h). */
extern struct tg_params tg_params;
extern volatile u64 tg_ticks;
void disk_round(u64 round); /* user/disk.c */
#endif

#endif
