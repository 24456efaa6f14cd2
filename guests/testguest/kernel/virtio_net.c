/* A tiny virtio-net driver over virtio-mmio that answers ARP requests and ICMP
 * echo requests for one IPv4 address (tg.ip=a.b.c.d), so the VMM's network
 * device, its snapshots and migrations can be tested with the kernel's own
 * stack on the host side. Polled from the BSP's timer tick (1 kHz): receive
 * buffers are reposted after each frame, and each reply is one descriptor on
 * the transmit queue, which the VMM sends before the QueueNotify write returns.
 * No interrupts (VIRTQ_AVAIL_F_NO_INTERRUPT), no offloads: VERSION_1 and MAC. */
#include "virtio_mmio.h"

#define VIRTIO_ID_NET 1
#define QSIZE 16
#define BUF_SIZE 2048
#define HDR 12 /* struct virtio_net_hdr_v1 */
#define RXQ 0
#define TXQ 1

#define F_MAC (1U << 5)

#define ETH_ARP 0x0806
#define ETH_IP 0x0800

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
struct queue {
	struct desc desc[QSIZE] __attribute__((aligned(16)));
	struct avail avail __attribute__((aligned(4)));
	struct used used __attribute__((aligned(4)));
	u8 buf[QSIZE][BUF_SIZE];
};

static struct queue rxq, txq;
static u16 rx_seen;
static u64 regs;
static u8 mac[6], ip[4];
volatile u8 net_up; /* irq0 polls only once this is set */

static u32 reg_read(u32 off)
{
	return mmio_read32(regs, off);
}

static void reg_write(u32 off, u32 v)
{
	mmio_write32(regs, off, v);
}

static u16 be16(const u8 *p)
{
	return (u16)(p[0] << 8 | p[1]);
}

static void put_be16(u8 *p, u16 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}

static int same(const u8 *a, const u8 *b, u64 n)
{
	while (n--)
		if (*a++ != *b++)
			return 0;
	return 1;
}

/* The Internet checksum of n bytes (RFC 1071). */
static u16 checksum(const u8 *p, u64 n)
{
	u64 sum = 0;

	for (; n > 1; p += 2, n -= 2)
		sum += be16(p);
	if (n)
		sum += (u64)p[0] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)~sum;
}

/* "a.b.c.d" into ip[]; 0 if malformed. */
static int parse_ip(const char *s)
{
	for (int i = 0; i < 4; i++) {
		u64 v = 0;
		int digits = 0;

		for (; *s >= '0' && *s <= '9'; s++, digits++)
			v = v * 10 + (u64)(*s - '0');
		if (!digits || v > 255 || (i < 3 && *s++ != '.'))
			return 0;
		ip[i] = (u8)v;
	}
	return *s == 0 || *s == ' ';
}

static int setup_queue(u32 index, struct queue *q)
{
	reg_write(R_QUEUE_SEL, index);
	if (reg_read(R_QUEUE_NUM_MAX) < QSIZE)
		return 0;
	reg_write(R_QUEUE_NUM, QSIZE);
	mmio_write64(regs, R_QUEUE_DESC, (u64)q->desc);
	mmio_write64(regs, R_QUEUE_DRIVER, (u64)&q->avail);
	mmio_write64(regs, R_QUEUE_DEVICE, (u64)&q->used);
	q->avail.flags = AVAIL_F_NO_INTERRUPT; /* polled */
	reg_write(R_QUEUE_READY, 1);
	return reg_read(R_QUEUE_READY) == 1;
}

/* The first virtio-mmio device on the command line that is a network device. */
static u64 find_net(const char *cmdline)
{
	for (const char *v = cmdline_value(cmdline, "virtio_mmio.device"); v;
	     v = cmdline_value(v, "virtio_mmio.device")) {
		const char *at = v;
		u64 base;

		while (*at && *at != '@' && *at != ' ')
			at++;
		if (*at != '@')
			continue;
		base = parse_u64(at + 1);
		if (mmio_read32(base, R_MAGIC) == VIRTIO_MAGIC && mmio_read32(base, R_DEVICE_ID) == VIRTIO_ID_NET)
			return base;
	}
	return 0;
}

/* Set up the device and post every receive buffer; 1 if the network is up. */
int net_init(const char *cmdline)
{
	const char *addr = cmdline_value(cmdline, "tg.ip");

	if (!addr || !parse_ip(addr))
		return 0;
	regs = find_net(cmdline);
	if (!regs || reg_read(R_VERSION) != 2)
		return 0;
	reg_write(R_STATUS, 0);
	reg_write(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
	reg_write(R_DEVICE_FEATURES_SEL, 0);
	if (!(reg_read(R_DEVICE_FEATURES) & F_MAC))
		return 0;
	reg_write(R_DRIVER_FEATURES_SEL, 0);
	reg_write(R_DRIVER_FEATURES, F_MAC);
	reg_write(R_DRIVER_FEATURES_SEL, 1);
	reg_write(R_DRIVER_FEATURES, 1); /* VIRTIO_F_VERSION_1 */
	reg_write(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
	if (!(reg_read(R_STATUS) & S_FEATURES_OK))
		return 0;
	if (!setup_queue(RXQ, &rxq) || !setup_queue(TXQ, &txq))
		return 0;
	for (u32 i = 0; i < 6; i++)
		mac[i] = *(volatile u8 *)(regs + R_CONFIG + i);
	for (u16 i = 0; i < QSIZE; i++) {
		rxq.desc[i] = (struct desc){ (u64)rxq.buf[i], BUF_SIZE, DESC_F_WRITE, 0 };
		rxq.avail.ring[i] = i;
	}
	__asm__ volatile("" ::: "memory");
	rxq.avail.idx = QSIZE;
	reg_write(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	reg_write(R_QUEUE_NOTIFY, RXQ);
	net_up = 1;
	return 1;
}

/* Send the frame in txq.buf[slot] (after its zeroed header). */
static void transmit(u16 slot, u64 frame_len)
{
	if (frame_len < 60) {
		memset(txq.buf[slot] + HDR + frame_len, 0, 60 - frame_len);
		frame_len = 60;
	}
	txq.desc[slot] = (struct desc){ (u64)txq.buf[slot], (u32)(HDR + frame_len), 0, 0 };
	txq.avail.ring[txq.avail.idx % QSIZE] = slot;
	__asm__ volatile("" ::: "memory");
	txq.avail.idx++;
	__asm__ volatile("" ::: "memory");
	reg_write(R_QUEUE_NOTIFY, TXQ);
}

/* Answer one received frame if it is an ARP request or an echo request for us. */
static void answer(const u8 *f, u64 len)
{
	u16 slot = txq.avail.idx % QSIZE;
	u8 *r = txq.buf[slot] + HDR;

	if (len < 14)
		return;
	memset(txq.buf[slot], 0, HDR);
	if (be16(f + 12) == ETH_ARP && len >= 42 && be16(f + 14) == 1 && be16(f + 16) == ETH_IP &&
	    be16(f + 20) == 1 && same(f + 38, ip, 4)) {
		memcpy(r, f + 6, 6);
		memcpy(r + 6, mac, 6);
		memcpy(r + 12, f + 12, 8); /* ethertype, htype, ptype, hlen, plen */
		put_be16(r + 20, 2); /* reply */
		memcpy(r + 22, mac, 6);
		memcpy(r + 28, ip, 4);
		memcpy(r + 32, f + 22, 10); /* the asker's MAC and IP */
		transmit(slot, 42);
		return;
	}
	if (be16(f + 12) != ETH_IP || len < 34)
		return;
	const u8 *p = f + 14;
	u64 ihl = (u64)(p[0] & 0xf) * 4, total = be16(p + 2);

	if ((p[0] >> 4) != 4 || ihl < 20 || total < ihl + 8 || 14 + total > len || total > BUF_SIZE - HDR - 14 ||
	    p[9] != 1 || !same(p + 16, ip, 4) || p[ihl] != 8)
		return;
	memcpy(r, f + 6, 6);
	memcpy(r + 6, mac, 6);
	put_be16(r + 12, ETH_IP);
	u8 *q = r + 14;

	memcpy(q, p, total);
	memcpy(q + 12, ip, 4);
	memcpy(q + 16, p + 12, 4);
	q[8] = 64; /* TTL */
	put_be16(q + 10, 0);
	put_be16(q + 10, checksum(q, ihl));
	q[ihl] = 0; /* echo reply */
	put_be16(q + ihl + 2, 0);
	put_be16(q + ihl + 2, checksum(q + ihl, total - ihl));
	transmit(slot, 14 + total);
}

/* From irq0 on every tick while the network is up. */
void net_poll(void)
{
	int reposted = 0;

	while (*(volatile u16 *)&rxq.used.idx != rx_seen) {
		u16 slot = rx_seen % QSIZE;
		u32 id = rxq.used.ring[slot].id, len = rxq.used.ring[slot].len;

		if (id < QSIZE) {
			if (len > HDR && len <= BUF_SIZE)
				answer(rxq.buf[id] + HDR, len - HDR);
			rxq.avail.ring[rxq.avail.idx % QSIZE] = (u16)id;
			__asm__ volatile("" ::: "memory");
			rxq.avail.idx++;
			reposted = 1;
		}
		rx_seen++;
	}
	if (reposted)
		reg_write(R_QUEUE_NOTIFY, RXQ);
}
