/* The disk workload (ring 3, CPU 0 only): after every round of the memory
 * workload, write tg.diskwrites pseudo-random 4 KiB blocks of the first
 * tg.diskblocks blocks of the disk with a pattern of (seed, block, seq), then
 * read every one of those blocks back and check it. A block never written must
 * read as zeros.
 *
 * With tg.diskseq=1 the blocks are written in order instead, continuing round
 * after round; tg.diskverify=n reads back only every n rounds (benchmarks).
 *
 * The seq table lives in guest RAM, so a snapshot of memory and disk taken at
 * the same instant restores a state that verifies; a disk from another instant
 * (older, or carrying writes made after the snapshot) does not. The one write
 * that may be in flight when a snapshot is taken is recorded in `pending`:
 * that block may hold either its old or its new contents. */
#include "../include/tg.h"
#include "../include/fmt.h"
#include "pattern.h"
#include "usys.h"

#define DISK_SALT 0xd15cb10c5eed0001UL
#define IO_BLOCKS 16 /* blocks per read request: 64 KiB */

static u32 disk_seq[MAX_DISK_BLOCKS];
static struct {
	u64 block; /* block + 1; 0 = no write in flight */
	u32 seq;
} pending;
static u64 io_buf[IO_BLOCKS * WORDS_PER_PAGE] __attribute__((aligned(4096)));

static u64 block_word(u64 block, u32 seq, u64 w)
{
	return seq ? pattern_word(page_key(tg_params.seed ^ DISK_SALT, block, seq), w) : 0;
}

/* Does p hold block's contents at seq? */
static int block_is(const u64 *p, u64 block, u32 seq)
{
	u64 key = page_key(tg_params.seed ^ DISK_SALT, block, seq), bad = 0;

	if (!seq) {
		for (u64 w = 0; w < WORDS_PER_PAGE; w++)
			bad |= p[w];
		return !bad;
	}
	for (u64 w = 0; w < WORDS_PER_PAGE; w++)
		bad |= p[w] ^ pattern_word(key, w);
	return !bad;
}

__attribute__((noreturn)) static void disk_fail(const char *what, u64 block, u64 value)
{
	struct line l = { 0 };

	line_str(&l, what);
	line_kv(&l, "block", block);
	line_kv(&l, "status", value);
	line_end(&l);
	sys_fail(l.buf, l.len);
}

__attribute__((noreturn)) static void disk_verify_fail(u64 block, const u64 *p)
{
	struct line l = { 0 };
	u32 seq = disk_seq[block];
	u64 w = 0;

	while (w < WORDS_PER_PAGE - 1 && p[w] == block_word(block, seq, w))
		w++;
	line_str(&l, "tg: VERIFY FAIL disk");
	line_kv(&l, "block", block);
	line_kv(&l, "seq", seq);
	line_kv(&l, "offset", w * 8);
	line_str(&l, " expected=");
	line_hex(&l, block_word(block, seq, w));
	line_str(&l, " got=");
	line_hex(&l, p[w]);
	line_end(&l);
	sys_fail(l.buf, l.len);
}

static void write_block(u64 block)
{
	u32 seq = disk_seq[block] + 1;
	u64 key = page_key(tg_params.seed ^ DISK_SALT, block, seq), status;

	for (u64 w = 0; w < WORDS_PER_PAGE; w++)
		io_buf[w] = pattern_word(key, w);
	pending.seq = seq;
	pending.block = block + 1;
	status = sys_disk(1, block * SECTORS_PER_BLOCK, SECTORS_PER_BLOCK, io_buf);
	if (status != DISK_S_OK)
		disk_fail("tg: DISK FAIL write", block, status);
	disk_seq[block] = seq;
	pending.block = 0;
}

static u64 verify_disk(void)
{
	u64 n = tg_params.disk_blocks;

	for (u64 first = 0; first < n; first += IO_BLOCKS) {
		u64 count = n - first < IO_BLOCKS ? n - first : IO_BLOCKS;
		u64 status = sys_disk(0, first * SECTORS_PER_BLOCK, count * SECTORS_PER_BLOCK, io_buf);

		if (status != DISK_S_OK)
			disk_fail("tg: DISK FAIL read", first, status);
		for (u64 i = 0; i < count; i++) {
			const u64 *p = io_buf + i * WORDS_PER_PAGE;
			u64 block = first + i;

			if (block_is(p, block, disk_seq[block]))
				continue;
			if (pending.block == block + 1 && block_is(p, block, pending.seq)) {
				/* the in-flight write had landed when the snapshot was taken */
				disk_seq[block] = pending.seq;
				pending.block = 0;
				continue;
			}
			disk_verify_fail(block, p);
		}
	}
	return n;
}

void disk_round(u64 round)
{
	const struct tg_params *p = &tg_params;
	u64 written = 0;
	struct line l = { 0 };

	u64 verified = 0;

	if (round)
		for (; written < p->disk_writes; written++) {
			u64 n = (round - 1) * p->disk_writes + written;

			write_block(p->disk_seq ? n % p->disk_blocks
					       : mix64(mix64(p->seed ^ DISK_SALT) + round * 0x10000 + written) % p->disk_blocks);
		}
	if (round % p->disk_verify == 0)
		verified = verify_disk();
	line_str(&l, "tg: disk");
	line_kv(&l, "round", round);
	line_kv(&l, "written", written);
	line_kv(&l, "verified", verified);
	line_kv(&l, "ticks", tg_ticks);
	line_end(&l);
	sys_write(l.buf, l.len);
}
