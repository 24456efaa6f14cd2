/* The command line and the RAM map, from either boot path:
 *  - snapvisor (Linux 64-bit boot protocol): RSI = struct boot_params,
 *    cmd_line_ptr at 0x228, e820_entries at 0x1e8, e820 table at 0x2d0;
 *  - QEMU Multiboot: EBX = multiboot info, cmdline at +16 (flag bit 2),
 *    mmap_length/mmap_addr at +44/+48 (flag bit 6).
 * Both are copied into the kernel image at once: the loaders put them in memory
 * that the working set may later overwrite. */
#include "kernel.h"

#define E820_RAM 1

static void add_ram(struct boot_info *bi, u64 addr, u64 len, u32 type)
{
	if (type == E820_RAM && len && bi->nr_ram < MAX_E820) {
		bi->ram[bi->nr_ram].start = addr;
		bi->ram[bi->nr_ram].end = addr + len;
		bi->nr_ram++;
	}
}

static void copy_cmdline(struct boot_info *bi, u64 addr)
{
	const char *s = (const char *)addr;
	u32 i = 0;

	if (addr)
		for (; s[i] && i < sizeof(bi->cmdline) - 1; i++)
			bi->cmdline[i] = s[i];
	bi->cmdline[i] = 0;
}

static void read_zero_page(struct boot_info *bi, const u8 *zp)
{
	u32 n = zp[0x1e8];

	copy_cmdline(bi, *(const u32 *)(zp + 0x228));
	for (u32 i = 0; i < n; i++) {
		const u8 *e = zp + 0x2d0 + 20 * i;

		add_ram(bi, *(const u64 *)e, *(const u64 *)(e + 8), *(const u32 *)(e + 16));
	}
}

static void read_multiboot(struct boot_info *bi, const u8 *mbi)
{
	u32 flags = *(const u32 *)mbi;

	copy_cmdline(bi, flags & (1 << 2) ? *(const u32 *)(mbi + 16) : 0);
	if (flags & (1 << 6)) {
		u64 p = *(const u32 *)(mbi + 48), end = p + *(const u32 *)(mbi + 44);

		/* each entry: u32 size (not counting itself), u64 addr, u64 len, u32 type */
		while (p < end) {
			const u8 *e = (const u8 *)p;

			add_ram(bi, *(const u64 *)(e + 4), *(const u64 *)(e + 12),
				*(const u32 *)(e + 20));
			p += *(const u32 *)e + 4;
		}
	} else if (flags & 1) {
		add_ram(bi, 0x100000, (u64)*(const u32 *)(mbi + 8) << 10, E820_RAM);
	}
}

void bootinfo_read(struct boot_info *bi, enum boot_kind kind, u64 info)
{
	if (kind == BOOT_MULTIBOOT)
		read_multiboot(bi, (const u8 *)info);
	else
		read_zero_page(bi, (const u8 *)info);
}
