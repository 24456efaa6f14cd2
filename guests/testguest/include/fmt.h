/* Building console lines without a C library. Static inline so that the kernel
 * and the workload each get their own copy: ring-3 code must never call into
 * supervisor pages. */
#ifndef TG_FMT_H
#define TG_FMT_H

#include "tg.h"

#define LINE_MAX 192

struct line {
	u32 len;
	char buf[LINE_MAX];
};

static inline void line_str(struct line *l, const char *s)
{
	while (*s && l->len < LINE_MAX - 1)
		l->buf[l->len++] = *s++;
}

static inline void line_u64(struct line *l, u64 v)
{
	char tmp[20];
	int n = 0;

	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n && l->len < LINE_MAX - 1)
		l->buf[l->len++] = tmp[--n];
}

static inline void line_hex(struct line *l, u64 v)
{
	int shift = 60;

	line_str(l, "0x");
	while (shift > 0 && !(v >> shift))
		shift -= 4;
	for (; shift >= 0 && l->len < LINE_MAX - 1; shift -= 4)
		l->buf[l->len++] = "0123456789abcdef"[(v >> shift) & 15];
}

/* " key=<decimal>" */
static inline void line_kv(struct line *l, const char *key, u64 v)
{
	line_str(l, " ");
	line_str(l, key);
	line_str(l, "=");
	line_u64(l, v);
}

static inline void line_end(struct line *l)
{
	l->buf[l->len++] = '\n';
}

#endif
