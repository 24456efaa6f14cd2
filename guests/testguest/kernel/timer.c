/* The tick source: PIT channel 0 at 1 kHz through the remapped 8259 PIC to the
 * BSP (IRQ0 -> vector 32, counted by irq0 in entry64.S). APs do not see PIC
 * interrupts; to sleep between ticks they arm their LAPIC timer instead. */
#include "kernel.h"

#define PIC1 0x20
#define PIC2 0xa0
#define PIT_CH0 0x40
#define PIT_CMD 0x43
#define PIT_HZ 1193182UL
#define TICK_HZ 1000UL

#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0
#define LAPIC_TIMER_VECTOR 48
#define LAPIC_SPURIOUS_VECTOR 63
/* KVM's LAPIC timer counts at 1 GHz: one PIT tick. */
#define LAPIC_TICK_COUNT 1000000U
#define LAPIC_MAX_TICKS 100
#define LAPIC_TIMER_PERIODIC (1U << 17)

u64 tick_line_every;

static void lapic_write(u32 reg, u32 v)
{
	*(volatile u32 *)(LAPIC_PHYS + reg) = v;
}

void pic_pit_init(u64 every)
{
	if (every) {
		tick_line_every = every;
		tick_countdown = every;
	}
	/* ICW1..4: edge triggered, cascade, vectors 0x20 / 0x28, 8086 mode */
	outb(PIC1, 0x11);
	outb(PIC2, 0x11);
	outb(PIC1 + 1, 0x20);
	outb(PIC2 + 1, 0x28);
	outb(PIC1 + 1, 0x04);
	outb(PIC2 + 1, 0x02);
	outb(PIC1 + 1, 0x01);
	outb(PIC2 + 1, 0x01);
	outb(PIC1 + 1, 0xfe); /* only IRQ0 */
	outb(PIC2 + 1, 0xff);

	/* channel 0, lobyte/hibyte, mode 2 (rate generator) */
	outb(PIT_CMD, 0x34);
	outb(PIT_CH0, (u8)(PIT_HZ / TICK_HZ));
	outb(PIT_CH0, (u8)((PIT_HZ / TICK_HZ) >> 8));
}

void lapic_wake_init(void)
{
	lapic_write(LAPIC_SVR, 0x100 | LAPIC_SPURIOUS_VECTOR);
	lapic_write(LAPIC_TIMER_DIV, 0xb); /* divide by 1 */
	lapic_write(LAPIC_LVT_TIMER, LAPIC_TIMER_PERIODIC | LAPIC_TIMER_VECTOR);
}

/* Called from SYS_WAIT with interrupts off: sleep until tg_ticks reaches `until`.
 * The BSP wakes on every PIT tick anyway. An AP sleeps on its LAPIC timer, in
 * periodic mode so that a wake-up lost (say, across a snapshot) costs one more
 * period rather than a hang; the period is capped at LAPIC_MAX_TICKS. */
void wait_until(u32 cpu, u64 until)
{
	u64 now;

	/* one read per pass: the BSP advances tg_ticks meanwhile, and a zero count
	 * would stop the LAPIC timer instead of arming it */
	while ((now = tg_ticks) < until) {
		if (cpu) {
			u64 n = until - now;

			lapic_write(LAPIC_TIMER_INIT,
				    (u32)(n > LAPIC_MAX_TICKS ? LAPIC_MAX_TICKS : n) * LAPIC_TICK_COUNT);
		}
		__asm__ volatile("sti; hlt; cli" ::: "memory");
	}
	if (cpu)
		lapic_write(LAPIC_TIMER_INIT, 0); /* stop: ring 3 needs no wake-ups */
}
