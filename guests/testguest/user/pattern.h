/* Page contents as a function of (seed, page, seq). Each 8-byte word is an
 * independent splitmix64 output, so filling and checking run at memory speed
 * in ring 3 with plain integer operations. */
#ifndef PATTERN_H
#define PATTERN_H

#include "../include/tg.h"

#define WORDS_PER_PAGE (PAGE_SIZE / 8)

static inline u64 mix64(u64 z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
	return z ^ (z >> 31);
}

/* Different for every (page, seq) pair of a seed; page < 2^32 pages (16 TiB). */
static inline u64 page_key(u64 seed, u64 page, u32 seq)
{
	return mix64(seed ^ mix64(page << 32 | seq));
}

static inline u64 pattern_word(u64 key, u64 word)
{
	return mix64(key + word * 0x9e3779b97f4a7c15UL);
}

#endif
