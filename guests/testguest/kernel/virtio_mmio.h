/* The virtio-mmio (version 2) register window and split-ring flags, shared by
 * the test guest's virtio-blk and virtio-net drivers. */
#ifndef VIRTIO_MMIO_H
#define VIRTIO_MMIO_H

#include "kernel.h"

#define VIRTIO_MAGIC 0x74726976

#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_STATUS 0x070
#define R_QUEUE_DESC 0x080
#define R_QUEUE_DRIVER 0x090
#define R_QUEUE_DEVICE 0x0a0
#define R_CONFIG 0x100

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 64

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1

struct desc {
	u64 addr;
	u32 len;
	u16 flags, next;
};

static inline u32 mmio_read32(u64 base, u32 off)
{
	return *(volatile u32 *)(base + off);
}

static inline void mmio_write32(u64 base, u32 off, u32 v)
{
	*(volatile u32 *)(base + off) = v;
}

static inline void mmio_write64(u64 base, u32 off, u64 v)
{
	mmio_write32(base, off, (u32)v);
	mmio_write32(base, off + 4, (u32)(v >> 32));
}

#endif
