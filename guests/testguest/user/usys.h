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

static inline u64 sys4(u64 nr, u64 a, u64 b, u64 c, u64 d)
{
	__asm__ volatile("int3" : "+a"(nr) : "D"(a), "S"(b), "d"(c), "c"(d) : "memory");
	return nr;
}

/* One disk request (write=0: read) of `sectors` sectors at `sector`; returns
 * the virtio-blk status (DISK_S_OK) or DISK_S_NODEV. */
static inline u64 sys_disk(u64 write, u64 sector, u64 sectors, void *buf)
{
	return sys4(SYS_DISK, write, sector, sectors, (u64)buf);
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
