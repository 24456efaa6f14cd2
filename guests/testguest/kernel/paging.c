/* Our own identity map of the low 4 GiB.
 * The first 2 MiB (low memory and the image) use 4 KiB pages so that only the
 * workload's sections are user-accessible and page 0 stays unmapped; the rest
 * uses 2 MiB pages, user-accessible, for the working set. 3-4 GiB is the MMIO hole
 * (LAPIC) and is mapped uncached. */
#include "kernel.h"

#define PTE_P 0x1UL
#define PTE_W 0x2UL
#define PTE_U 0x4UL
#define PTE_PWT 0x8UL
#define PTE_PCD 0x10UL
#define PTE_PS 0x80UL

static u64 pml4[512] __attribute__((aligned(4096)));
static u64 pdpt[512] __attribute__((aligned(4096)));
static u64 pd[4][512] __attribute__((aligned(4096)));
static u64 pt_low[512] __attribute__((aligned(4096)));

void paging_init(void)
{
	u64 ustart = (u64)__user_start, uend = (u64)__user_end;

	for (u64 i = 1; i < 512; i++) {
		u64 a = i * PAGE_SIZE;

		pt_low[i] = a | PTE_P | PTE_W | (a >= ustart && a < uend ? PTE_U : 0);
	}
	for (u64 g = 0; g < 4; g++) {
		u64 attr = PTE_P | PTE_W | PTE_U | PTE_PS | (g == 3 ? PTE_PCD | PTE_PWT : 0);
		u64 a = g << 30;

		for (u64 i = 0; i < 512; i++, a += 0x200000)
			pd[g][i] = a | attr;
		pdpt[g] = (u64)pd[g] | PTE_P | PTE_W | PTE_U;
	}
	pd[0][0] = (u64)pt_low | PTE_P | PTE_W | PTE_U;
	pml4[0] = (u64)pdpt | PTE_P | PTE_W | PTE_U;
}

void paging_load(void)
{
	__asm__ volatile("mov %0, %%cr3" : : "r"(pml4) : "memory");
}
