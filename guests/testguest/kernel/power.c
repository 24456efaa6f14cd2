/* Power off through the snapvisor power-off port (QEMU: -device isa-debug-exit). */
#include "kernel.h"

#define POWER_OFF_PORT 0x501

u8 exit_status;

void power_off(u8 status)
{
	outb(POWER_OFF_PORT, status);
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* A CPU with nothing left to do; interrupts stay on so the BSP keeps counting
 * ticks for CPUs still working. */
void idle_forever(void)
{
	for (;;)
		__asm__ volatile("sti; hlt; cli" ::: "memory");
}
