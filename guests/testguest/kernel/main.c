/* Boot flow. Every CPU arrives here on its own kernel stack. CPU 0 reads the boot
 * information, builds the page tables and the working-set geometry, starts the
 * timer and then releases the others; each CPU then loads its descriptor tables
 * and drops to the ring-3 workload. */
#include "kernel.h"
#include "../include/fmt.h"

#define WS_ALIGN 0x200000UL /* the working set starts on a 2 MiB page */
#define CPU_START_TIMEOUT_TICKS 1000

static struct boot_info boot_info;
static volatile u32 go, cpus_started = 1;

static void print_line(struct line *l)
{
	line_end(l);
	console_write(l->buf, l->len);
}

/* Place the sequence table and the pages in one usable RAM range above the image. */
static int working_set_init(const struct kparams *kp)
{
	u64 pages = kp->mem_mib * (1UL << 20) / PAGE_SIZE;
	u64 table = (pages * sizeof(u32) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
	u64 floor = ((u64)__image_end + WS_ALIGN - 1) & ~(WS_ALIGN - 1);
	u64 best = 0;

	for (u32 i = 0; i < boot_info.nr_ram; i++) {
		u64 start = boot_info.ram[i].start, end = boot_info.ram[i].end;

		start = start < floor ? floor : (start + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
		end = (end > MAP_LIMIT ? MAP_LIMIT : end) & ~(PAGE_SIZE - 1);
		if (end <= start)
			continue;
		if (end - start >= table + pages * PAGE_SIZE) {
			tg_params.seq = (u32 *)start;
			tg_params.base = (u8 *)(start + table);
			tg_params.total_pages = pages;
			return 1;
		}
		if (end - start > best)
			best = end - start;
	}
	struct line l = { 0 };

	line_str(&l, "tg: ERROR not enough RAM for");
	line_kv(&l, "tg.mem", kp->mem_mib);
	line_kv(&l, "largest_mib", best >> 20);
	print_line(&l);
	return 0;
}

/* The disk workload needs tg.diskblocks 4 KiB blocks of the first virtio-blk disk. */
static void disk_setup(const struct kparams *kp)
{
	u64 sectors = disk_init(virtio_mmio_base(boot_info.cmdline));
	struct line l = { 0 };

	if (sectors >= kp->disk_blocks * SECTORS_PER_BLOCK && kp->disk_blocks) {
		tg_params.disk_blocks = kp->disk_blocks;
		tg_params.disk_writes = kp->disk_writes;
		tg_params.disk_seq = kp->disk_seq;
		tg_params.disk_verify = kp->disk_verify;
		line_str(&l, "tg: disk ok");
		line_kv(&l, "sectors", sectors);
		print_line(&l);
		return;
	}
	line_str(&l, "tg: ERROR no usable disk for");
	line_kv(&l, "tg.diskblocks", kp->disk_blocks);
	line_kv(&l, "sectors", sectors);
	print_line(&l);
	power_off(EXIT_CONFIG);
}

/* tg.ip=a.b.c.d: answer ARP and ping on the first virtio-net device. */
static void net_setup(void)
{
	if (net_init(boot_info.cmdline)) {
		console_write("tg: net ok\n", 11);
		return;
	}
	console_write("tg: ERROR no usable network device for tg.ip\n", 45);
	power_off(EXIT_CONFIG);
}

static u64 ram_top(void)
{
	u64 top = 0;

	for (u32 i = 0; i < boot_info.nr_ram; i++)
		if (boot_info.ram[i].end > top)
			top = boot_info.ram[i].end;
	return top;
}

static void bsp_init(enum boot_kind kind, u64 info)
{
	struct kparams kp;
	struct line l = { 0 };

	bootinfo_read(&boot_info, kind, info);
	cmdline_parse(boot_info.cmdline, &kp);
	serial_init();
	line_str(&l, "tg: snapvisor-testguest 1");
	line_kv(&l, "cpus", kp.cpus);
	line_kv(&l, "mem", kp.mem_mib);
	line_kv(&l, "seed", kp.seed);
	print_line(&l);

	idt_init();
	paging_init(ram_top());
	/* every virtio-mmio window lies in the first one's 2 MiB page */
	if (kp.disk || kp.net)
		paging_map_mmio(virtio_mmio_base(boot_info.cmdline));
	for (u32 c = 0; c < kp.cpus; c++)
		tss_init(c);
	gdt_idt_load(0);
	paging_load();

	exit_status = (u8)kp.exit_status;
	tg_params.seed = kp.seed;
	tg_params.rate_mib = kp.rate;
	tg_params.rounds = kp.rounds;
	tg_params.pages = kp.pages;
	tg_params.verify_every = kp.verify;
	tg_params.corrupt_round = kp.corrupt;
	tg_params.work = kp.work;
	tg_params.cpus = (u32)kp.cpus;
	if (!working_set_init(&kp))
		power_off(EXIT_CONFIG);
	if (kp.disk)
		disk_setup(&kp);
	if (kp.net)
		net_setup();

	pic_pit_init(kp.ticks);
	while (!tg_ticks)
		__asm__ volatile("sti; hlt; cli" ::: "memory");
	console_write("tg: timer ok\n", 13);
}

/* A tg.cpus larger than the VM's vCPU count would otherwise hang at "done". */
static void wait_for_cpus(void)
{
	u64 deadline = tg_ticks + CPU_START_TIMEOUT_TICKS;

	while (cpus_started < tg_params.cpus && tg_ticks < deadline)
		__asm__ volatile("sti; hlt; cli" ::: "memory");
	if (cpus_started < tg_params.cpus) {
		struct line l = { 0 };

		line_str(&l, "tg: ERROR only");
		line_kv(&l, "started", cpus_started);
		line_kv(&l, "of tg.cpus", tg_params.cpus);
		print_line(&l);
		power_off(EXIT_CONFIG);
	}
}

__attribute__((noreturn)) void kmain(u32 cpu, enum boot_kind kind, u64 info)
{
	if (cpu == 0) {
		bsp_init(kind, info);
		__atomic_store_n(&go, 1, __ATOMIC_RELEASE);
		wait_for_cpus();
	} else {
		while (!__atomic_load_n(&go, __ATOMIC_ACQUIRE))
			cpu_relax();
		if (cpu >= tg_params.cpus)
			for (;;)
				__asm__ volatile("cli; hlt");
		gdt_idt_load(cpu);
		paging_load();
		lapic_wake_init();
		__atomic_add_fetch(&cpus_started, 1, __ATOMIC_RELEASE);
	}
	/* -8: user_main starts as if called, with a return-address slot */
	enter_user((u64)user_main, (u64)ustacks[cpu] + USTACK_SIZE - 8, cpu);
}
