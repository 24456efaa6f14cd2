/* System calls from ring 3: int3 into the kernel (int n and syscall are broken on
 * PVM; int3 from ring 3 is delivered through the IDT). */
#ifndef USYS_H
#define USYS_H

#include "../include/tg.h"

static inline u64 sys2(u64 nr, u64 a, u64 b)
{
	__asm__ volatile("int3" : "+a"(nr) : "D"(a), "S"(b) : "memory");
	return nr;
}

static inline void sys_write(const char *buf, u64 len)
{
	sys2(SYS_WRITE, (u64)buf, len);
}

static inline void sys_wait_until(u64 tick)
{
	sys2(SYS_WAIT, tick, 0);
}

__attribute__((noreturn)) static inline void sys_fail(const char *buf, u64 len)
{
	sys2(SYS_FAIL, (u64)buf, len);
	__builtin_unreachable();
}

__attribute__((noreturn)) static inline void sys_finish(void)
{
	sys2(SYS_FINISH, 0, 0);
	__builtin_unreachable();
}

#endif
