/* COM1 console. Every port access is a VM exit, so lines are written whole and
 * under a lock that keeps CPUs' lines from interleaving. */
#include "kernel.h"

#define COM1 0x3f8
#define LSR_THRE 0x20

static volatile u32 console_lock;

void serial_init(void)
{
	outb(COM1 + 1, 0x00); /* no UART interrupts: we poll */
	outb(COM1 + 3, 0x03); /* 8N1 */
}

void console_write_unlocked(const char *buf, u64 len)
{
	for (u64 i = 0; i < len; i++) {
		while (!(inb(COM1 + 5) & LSR_THRE))
			cpu_relax();
		outb(COM1, (u8)buf[i]);
	}
}

/* Kernel code runs with interrupts off, so the lock cannot be re-entered. */
void console_write(const char *buf, u64 len)
{
	while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
		cpu_relax();
	console_write_unlocked(buf, len);
	__atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
}
