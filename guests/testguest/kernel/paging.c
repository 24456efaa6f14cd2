/* Our own identity map, below 4 GiB.
 * The first 2 MiB (low memory and the image) use 4 KiB pages so that only the
 * workload's sections are user-accessible and page 0 stays unmapped; RAM above
 * uses 2 MiB pages, user-accessible, for the working set. The LAPIC page (used by
 * APs to sleep) is mapped uncached and supervisor-only. */
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

/* Only RAM up to ram_top and the LAPIC's page are mapped: every entry written
 * here costs emulated instructions at boot. */
void paging_init(u64 ram_top)
{
	u64 ustart = (u64)__user_start, uend = (u64)__user_end;
	u64 top = ram_top > MAP_LIMIT ? MAP_LIMIT : ram_top;

	for (u64 i = 1; i < 512; i++) {
		u64 a = i * PAGE_SIZE;

		pt_low[i] = a | PTE_P | PTE_W | (a >= ustart && a < uend ? PTE_U : 0);
	}
	for (u64 a = 0x200000; a < top; a += 0x200000)
		pd[a >> 30][(a >> 21) & 511] = a | PTE_P | PTE_W | PTE_U | PTE_PS;
	pd[LAPIC_PHYS >> 30][(LAPIC_PHYS >> 21) & 511] =
		(LAPIC_PHYS & ~0x1fffffUL) | PTE_P | PTE_W | PTE_PS | PTE_PCD | PTE_PWT;
	pd[0][0] = (u64)pt_low | PTE_P | PTE_W | PTE_U;
	for (u64 g = 0; g < 4; g++)
		pdpt[g] = (u64)pd[g] | PTE_P | PTE_W | PTE_U;
	pml4[0] = (u64)pdpt | PTE_P | PTE_W | PTE_U;
}

/* A device's registers: the 2 MiB page holding phys, uncached, supervisor-only.
 * Call before paging_load(). */
void paging_map_mmio(u64 phys)
{
	if (phys < MAP_LIMIT)
		pd[phys >> 30][(phys >> 21) & 511] = (phys & ~0x1fffffUL) | PTE_P | PTE_W | PTE_PS | PTE_PCD | PTE_PWT;
}

void paging_load(void)
{
	__asm__ volatile("mov %0, %%cr3" : : "r"(pml4) : "memory");
}
