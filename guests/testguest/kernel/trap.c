/* Exceptions and the int3 system calls of the ring-3 workload. */
#include "kernel.h"
#include "../include/fmt.h"

static volatile u32 cpus_finished;

static void print_line(struct line *l)
{
	line_end(l);
	console_write(l->buf, l->len);
}

/* Any exception other than int3 from ring 3 ends the run: the guest is a test. */
__attribute__((noreturn)) static void fault(struct trap_frame *f)
{
	struct line l = { 0 };

	line_str(&l, "tg: FAULT");
	line_kv(&l, "vec", f->vector);
	line_str(&l, " rip=");
	line_hex(&l, f->rip);
	if (f->vector == 14) {
		u64 cr2;

		__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
		line_str(&l, " cr2=");
		line_hex(&l, cr2);
	}
	line_end(&l);
	/* no lock: the fault may have hit while it was held */
	console_write_unlocked(l.buf, l.len);
	power_off(EXIT_FAULT);
}

__attribute__((noreturn)) static void finish(void)
{
	if (__atomic_add_fetch(&cpus_finished, 1, __ATOMIC_ACQ_REL) == tg_params.cpus) {
		console_write("tg: done\n", 9);
		power_off(exit_status);
	}
	idle_forever();
}

void trap(struct trap_frame *f)
{
	if (f->vector != 3 || (f->cs & 3) != 3)
		fault(f);
	switch (f->rax) {
	case SYS_WRITE:
		console_write((const char *)f->rdi, f->rsi);
		break;
	case SYS_WAIT:
		wait_until(this_cpu(), f->rdi);
		break;
	case SYS_FAIL:
		console_write((const char *)f->rdi, f->rsi);
		power_off(EXIT_VERIFY_FAIL);
	case SYS_FINISH:
		finish();
	case SYS_DISK:
		f->rax = disk_io(f->rdi, f->rsi, f->rdx, f->rcx);
		break;
	default:
		fault(f);
	}
}

/* From irq0 every tg.ticks ticks. */
void tick_line(void)
{
	struct line l = { 0 };

	tick_countdown = tick_line_every;
	line_str(&l, "tg:");
	line_kv(&l, "ticks", tg_ticks);
	print_line(&l);
}

/* From irq0 when there is more to do than counting the tick. */
void irq0_work(void)
{
	if (!tick_countdown)
		tick_line();
	if (net_up)
		net_poll();
}
