/*
 * The physical limit for snapvisor's run loop: a minimal C VMM doing the same
 * KVM_RUN / port-I/O round trip as bench/boot.py measures in Python.
 *
 * The guest (64-bit mode, same boot state as snapvisor's loader) runs
 *     loop: inc rbx; out 0x80, al; jmp loop
 * so every iteration is one KVM_EXIT_IO. Prints one JSON object.
 * Usage: pio_loop SECONDS
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (4u << 20)
#define GDT 0x500
#define TSS 0x1000
#define PML4 0x9000
#define PDPT 0xa000
#define PD 0xb000
#define CODE 0x100000

static void die(const char *what)
{
	fprintf(stderr, "pio_loop: %s: %s\n", what, strerror(errno));
	exit(1);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void segment(struct kvm_segment *s, uint16_t selector, uint8_t type, int code)
{
	memset(s, 0, sizeof(*s));
	s->limit = 0xffffffff;
	s->selector = selector;
	s->type = type;
	s->present = 1;
	s->s = 1;
	s->g = 1;
	s->l = code;
	s->db = !code;
}

int main(int argc, char **argv)
{
	double seconds = argc > 1 ? atof(argv[1]) : 2.0;
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000) < 0)
		die("KVM_SET_TSS_ADDR");
	if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
		die("KVM_CREATE_IRQCHIP");
	struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
	if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0)
		die("KVM_CREATE_PIT2");

	uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uintptr_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");

	uint64_t *gdt = (uint64_t *)(mem + GDT);
	gdt[2] = 0x00af9b000000ffffull; /* 64-bit code */
	gdt[3] = 0x00cf93000000ffffull; /* flat data */
	gdt[4] = 0x00008b0000000067ull | ((uint64_t)TSS << 16); /* busy 64-bit TSS */
	*(uint64_t *)(mem + PML4) = PDPT | 3;
	*(uint64_t *)(mem + PDPT) = PD | 3;
	*(uint64_t *)(mem + PD) = 0x83; /* 2 MiB page at 0 */
	*(uint64_t *)(mem + PD + 8) = 0x200000 | 0x83;
	static const uint8_t code[] = { 0x48, 0xff, 0xc3, 0xe6, 0x80, 0xeb, 0xf9 };
	memcpy(mem + CODE, code, sizeof(code));

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");

	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	segment(&sregs.cs, 0x10, 0xb, 1);
	segment(&sregs.ds, 0x18, 0x3, 0);
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	memset(&sregs.tr, 0, sizeof(sregs.tr));
	sregs.tr.base = TSS;
	sregs.tr.limit = 0x67;
	sregs.tr.selector = 0x20;
	sregs.tr.type = 0xb;
	sregs.tr.present = 1;
	sregs.gdt.base = GDT;
	sregs.gdt.limit = 6 * 8 - 1;
	sregs.cr0 = 0x80050033;
	sregs.cr3 = PML4;
	sregs.cr4 = 0x620;
	sregs.efer = 0x501;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = CODE, .rflags = 2 };
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");

	uint64_t exits = 0;
	double start = now(), elapsed = 0;
	while (elapsed < seconds) {
		for (int i = 0; i < 1000; i++) {
			if (ioctl(vcpu, KVM_RUN, 0) < 0)
				die("KVM_RUN");
			if (run->exit_reason != KVM_EXIT_IO) {
				fprintf(stderr, "pio_loop: unexpected exit reason %u\n", run->exit_reason);
				return 1;
			}
			exits++;
		}
		elapsed = now() - start;
	}
	printf("{\"exits\": %llu, \"seconds\": %.6f, \"exits_per_second\": %.1f}\n",
	       (unsigned long long)exits, elapsed, exits / elapsed);
	return 0;
}
