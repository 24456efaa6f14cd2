/* A minimal virtio-blk driver over virtio-mmio (version 2, split virtqueue of 8
 * entries), polled: one request at a time, three descriptors (header, data,
 * status), and the VMM completes it before the QueueNotify write returns. Only
 * CPU 0 uses it. The device is found like Linux finds it, from
 * "virtio_mmio.device=<size>@<base>:<irq>" on the command line. */
#include "virtio_mmio.h"

#define VIRTIO_ID_BLOCK 2
#define QSIZE 8

struct avail {
	u16 flags, idx, ring[QSIZE], used_event;
};
struct used {
	u16 flags, idx;
	struct {
		u32 id, len;
	} ring[QSIZE];
	u16 avail_event;
};

static struct desc descs[QSIZE] __attribute__((aligned(16)));
static struct avail avail __attribute__((aligned(4)));
static struct used used __attribute__((aligned(4)));
static struct {
	u32 type, reserved;
	u64 sector;
} header;
static volatile u8 status;
static u64 regs; /* 0: no usable disk */
static u64 capacity; /* 512-byte sectors */

static u32 reg_read(u32 off)
{
	return mmio_read32(regs, off);
}

static void reg_write(u32 off, u32 v)
{
	mmio_write32(regs, off, v);
}

/* The device's register base from the command line, or 0. */
u64 virtio_mmio_base(const char *cmdline)
{
	const char *v = cmdline_value(cmdline, "virtio_mmio.device");

	if (!v)
		return 0;
	while (*v && *v != '@' && *v != ' ')
		v++;
	return *v == '@' ? parse_u64(v + 1) : 0;
}

/* Reset, negotiate VIRTIO_F_VERSION_1 only, set up queue 0. Returns the
 * capacity in sectors, or 0 if there is no usable virtio-blk device. */
u64 disk_init(u64 base)
{
	regs = base;
	if (!base || reg_read(R_MAGIC) != VIRTIO_MAGIC || reg_read(R_VERSION) != 2 ||
	    reg_read(R_DEVICE_ID) != VIRTIO_ID_BLOCK)
		goto fail;
	reg_write(R_STATUS, 0);
	reg_write(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
	reg_write(R_DEVICE_FEATURES_SEL, 1);
	if (!(reg_read(R_DEVICE_FEATURES) & 1))
		goto fail;
	reg_write(R_DRIVER_FEATURES_SEL, 0);
	reg_write(R_DRIVER_FEATURES, 0);
	reg_write(R_DRIVER_FEATURES_SEL, 1);
	reg_write(R_DRIVER_FEATURES, 1); /* VIRTIO_F_VERSION_1 */
	reg_write(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
	if (!(reg_read(R_STATUS) & S_FEATURES_OK))
		goto fail;
	reg_write(R_QUEUE_SEL, 0);
	if (reg_read(R_QUEUE_NUM_MAX) < QSIZE)
		goto fail;
	reg_write(R_QUEUE_NUM, QSIZE);
	mmio_write64(regs, R_QUEUE_DESC, (u64)descs);
	mmio_write64(regs, R_QUEUE_DRIVER, (u64)&avail);
	mmio_write64(regs, R_QUEUE_DEVICE, (u64)&used);
	avail.flags = AVAIL_F_NO_INTERRUPT; /* polled */
	reg_write(R_QUEUE_READY, 1);
	if (reg_read(R_QUEUE_READY) != 1)
		goto fail;
	reg_write(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	capacity = reg_read(R_CONFIG) | (u64)reg_read(R_CONFIG + 4) << 32;
	return capacity;
fail:
	regs = 0;
	return 0;
}

/* One read (write=0) or write of `sectors` sectors at `sector` to/from buf
 * (identity-mapped, so its address is the guest-physical one). */
u64 disk_io(u64 write, u64 sector, u64 sectors, u64 buf)
{
	u16 seen = used.idx;

	if (!regs || sector + sectors > capacity || sectors > (1UL << 22))
		return DISK_S_NODEV;
	header.type = write ? 1 : 0;
	header.reserved = 0;
	header.sector = sector;
	status = 0xff;
	descs[0] = (struct desc){ (u64)&header, sizeof(header), DESC_F_NEXT, 1 };
	descs[1] = (struct desc){ buf, (u32)(sectors * 512), DESC_F_NEXT | (write ? 0 : DESC_F_WRITE), 2 };
	descs[2] = (struct desc){ (u64)&status, 1, DESC_F_WRITE, 0 };
	avail.ring[avail.idx % QSIZE] = 0;
	__asm__ volatile("" ::: "memory"); /* the entry before the index that publishes it */
	avail.idx++;
	__asm__ volatile("" ::: "memory");
	reg_write(R_QUEUE_NOTIFY, 0);
	while (*(volatile u16 *)&used.idx == seen) {
		if (reg_read(R_STATUS) & S_NEEDS_RESET)
			return DISK_S_NODEV;
		cpu_relax();
	}
	return status;
}
