/* GDT, per-CPU TSS and the IDT. The VMM's descriptor tables are never relied on:
 * every CPU loads these before it takes an interrupt or enters ring 3. */
#include "kernel.h"

/* 64-bit TSS followed by the I/O permission bitmap. An all-zero bitmap inside the
 * TSS limit is what lets ring 3 use port I/O on PVM (IOPL is ignored there); the
 * trailing 0xff byte is required by the architecture. */
struct tss {
	u32 reserved0;
	u64 rsp0, rsp1, rsp2;
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
	u8 iomap[8192];
	u8 iomap_end;
} __attribute__((packed));

struct idt_gate {
	u16 off_lo, sel;
	u8 ist, attr;
	u16 off_mid;
	u32 off_hi, zero;
};

#define IDT_VECTORS 64
#define GATE_INTR 0x8e      /* present, DPL 0, interrupt gate (IF cleared) */
#define GATE_INTR_USER 0xee /* same, callable from ring 3 */

extern u64 gdt[];
extern u8 gdt_ptr[];
static struct tss tss[MAX_CPUS] __attribute__((aligned(16)));
static struct idt_gate idt[IDT_VECTORS] __attribute__((aligned(16)));

static struct __attribute__((packed)) {
	u16 limit;
	u64 base;
} idt_ptr = { sizeof(idt) - 1, (u64)idt };

void idt_init(void)
{
	for (int v = 0; v < IDT_VECTORS; v++) {
		u64 h = isr_table[v];

		if (!h)
			continue;
		idt[v].off_lo = (u16)h;
		idt[v].sel = SEL_KCODE;
		/* int3 is the ring-3 system call */
		idt[v].attr = v == 3 ? GATE_INTR_USER : GATE_INTR;
		idt[v].off_mid = (u16)(h >> 16);
		idt[v].off_hi = (u32)(h >> 32);
	}
}

void tss_init(u32 cpu)
{
	struct tss *t = &tss[cpu];
	u64 base = (u64)t, limit = sizeof(*t) - 1;
	u64 *d = &gdt[(SEL_TSS0 >> 3) + 2 * cpu];

	t->rsp0 = (u64)kstacks[cpu] + KSTACK_SIZE;
	t->iomap_base = (u16)((u64)t->iomap - base);
	t->iomap_end = 0xff; /* bitmap stays zero (bss): every port allowed */
	d[0] = (limit & 0xffff) | (base & 0xffffff) << 16 | 0x89UL << 40 |
	       (limit >> 16 & 0xf) << 48 | (base >> 24 & 0xff) << 56;
	d[1] = base >> 32;
}

void gdt_idt_load(u32 cpu)
{
	/* lretq reloads CS: a far jump to an absolute 64-bit target needs memory. */
	__asm__ volatile("lgdt (%0)\n\t"
			 "mov %1, %%ds\n\t"
			 "mov %1, %%es\n\t"
			 "mov %1, %%ss\n\t"
			 "xor %%eax, %%eax\n\t"
			 "mov %%eax, %%fs\n\t"
			 "mov %%eax, %%gs\n\t"
			 "pushq %2\n\t"
			 "lea 1f(%%rip), %%rax\n\t"
			 "pushq %%rax\n\t"
			 "lretq\n"
			 "1:"
			 :
			 : "r"(gdt_ptr), "r"(SEL_KDATA), "i"(SEL_KCODE)
			 : "rax", "memory");
	__asm__ volatile("ltr %w0" : : "r"(SEL_TSS0 + 16 * cpu));
	__asm__ volatile("lidt %0" : : "m"(idt_ptr));
}
