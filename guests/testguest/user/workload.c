/* The ring-3 workload, run natively on every CPU: fill this CPU's share of the
 * working set, then re-dirty and verify it round after round.
 * Every page's content is a function of (seed, page, seq[page]); the seq table is
 * guest memory too, so a snapshot taken at any instant restores a state that
 * verifies. */
#include "../include/tg.h"
#include "../include/fmt.h"
#include "pattern.h"
#include "usys.h"

struct tg_params tg_params;
volatile u64 tg_ticks;
u8 ustacks[MAX_CPUS][USTACK_SIZE] __attribute__((aligned(16)));

static u64 *page_ptr(u64 page)
{
	return (u64 *)(tg_params.base + page * PAGE_SIZE);
}

static void write_page(u64 page, u32 seq)
{
	u64 key = page_key(tg_params.seed, page, seq), *p = page_ptr(page);

	for (u64 w = 0; w < WORDS_PER_PAGE; w++)
		p[w] = pattern_word(key, w);
}

__attribute__((noreturn)) static void verify_fail(u64 cpu, u64 page, u32 seq, u64 word,
						 u64 expected, u64 got)
{
	struct line l = { 0 };

	line_str(&l, "tg: VERIFY FAIL");
	line_kv(&l, "cpu", cpu);
	line_kv(&l, "page", page);
	line_kv(&l, "seq", seq);
	line_kv(&l, "offset", word * 8);
	line_str(&l, " expected=");
	line_hex(&l, expected);
	line_str(&l, " got=");
	line_hex(&l, got);
	line_end(&l);
	sys_fail(l.buf, l.len);
}

/* Check every page in [first, end); returns the number of pages checked. */
static u64 verify(u64 cpu, u64 first, u64 end)
{
	for (u64 page = first; page < end; page++) {
		u32 seq = tg_params.seq[page];
		u64 key = page_key(tg_params.seed, page, seq);
		const u64 *p = page_ptr(page);
		u64 bad = 0;

		/* branch-free inner loop; locate the word only on a mismatch */
		for (u64 w = 0; w < WORDS_PER_PAGE; w++)
			bad |= p[w] ^ pattern_word(key, w);
		if (bad)
			for (u64 w = 0; w < WORDS_PER_PAGE; w++)
				if (p[w] != pattern_word(key, w))
					verify_fail(cpu, page, seq, w, pattern_word(key, w), p[w]);
	}
	return end - first;
}

/* CPU time spent before each page write: with tg.work the dirty rate follows the
 * CPU time the guest gets, like a compute-bound workload (what throttling slows),
 * rather than the wall clock (what tg.rate paces). */
static void busy_work(u64 steps)
{
	u64 x = steps;

	for (u64 i = 0; i < steps; i++)
		x = mix64(x);
	__asm__ volatile("" : : "r"(x));
}

/* Hold the re-dirty rate to tg.rate MiB/s: `done` pages since tick `t0` may be
 * written once (ticks - t0 + 1) ticks' budget covers them (one tick up front). */
static void rate_limit(u64 done, u64 t0)
{
	u64 bytes_per_tick_x1000 = tg_params.rate_mib << 20, need, until;

	if (!bytes_per_tick_x1000)
		return;
	need = (done * PAGE_SIZE * 1000 + bytes_per_tick_x1000 - 1) / bytes_per_tick_x1000;
	until = t0 + need - 1;
	if (tg_ticks < until)
		sys_wait_until(until);
}

static void round_line(u64 cpu, u64 round, u64 dirtied, u64 verified)
{
	struct line l = { 0 };

	line_str(&l, "tg:");
	line_kv(&l, "cpu", cpu);
	line_kv(&l, "round", round);
	line_kv(&l, "dirtied", dirtied);
	line_kv(&l, "verified", verified);
	line_kv(&l, "ticks", tg_ticks);
	line_end(&l);
	sys_write(l.buf, l.len);
}

__attribute__((noreturn)) void user_main(u64 cpu)
{
	const struct tg_params *p = &tg_params;
	u64 first = p->total_pages * cpu / p->cpus;
	u64 end = p->total_pages * (cpu + 1) / p->cpus;
	u64 owned = end - first;

	for (u64 page = first; page < end; page++) {
		write_page(page, 1);
		p->seq[page] = 1;
	}
	round_line(cpu, 0, owned, verify(cpu, first, end));
	if (cpu == 0 && p->disk_blocks)
		disk_round(0);

	for (u64 round = 1; owned && (!p->rounds || round <= p->rounds); round++) {
		u64 n = p->pages ? p->pages : owned, t0 = tg_ticks, verified = 0;

		for (u64 i = 0; i < n; i++) {
			/* all pages in order, or tg.pages picks from (seed, cpu, round, i) */
			u64 page = p->pages ? first + mix64(mix64(mix64(p->seed + cpu) + round) + i) % owned
					    : first + i;

			busy_work(p->work);
			write_page(page, ++p->seq[page]);
			rate_limit(i + 1, t0);
		}
		if (cpu == 0 && round == p->corrupt_round)
			page_ptr(first)[WORDS_PER_PAGE - 1] ^= 1; /* self-test of VERIFY FAIL */
		if (round % p->verify_every == 0)
			verified = verify(cpu, first, end);
		round_line(cpu, round, n, verified);
		if (cpu == 0 && p->disk_blocks)
			disk_round(round);
	}
	sys_finish();
}
