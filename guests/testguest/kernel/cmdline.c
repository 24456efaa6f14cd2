/* tg.* parameters from the kernel command line; other words are ignored. */
#include "kernel.h"

struct key {
	const char *name;
	u64 offset; /* into struct kparams */
};

#define KEY(n, field) { n, __builtin_offsetof(struct kparams, field) }
static const struct key keys[] = {
	KEY("tg.mem", mem_mib),      KEY("tg.seed", seed),     KEY("tg.rate", rate),
	KEY("tg.rounds", rounds),    KEY("tg.exit", exit_status), KEY("tg.cpus", cpus),
	KEY("tg.verify", verify),    KEY("tg.pages", pages),   KEY("tg.ticks", ticks),
	KEY("tg.corrupt", corrupt),  KEY("tg.disk", disk),     KEY("tg.diskblocks", disk_blocks),
	KEY("tg.diskwrites", disk_writes), KEY("tg.diskseq", disk_seq), KEY("tg.diskverify", disk_verify),
	KEY("tg.work", work),
};

/* Decimal, or hex with 0x. Stops at the end of the word. */
u64 parse_u64(const char *s)
{
	u64 v = 0;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		for (s += 2;; s++) {
			u32 d;

			if (*s >= '0' && *s <= '9')
				d = (u32)(*s - '0');
			else if ((*s | 0x20) >= 'a' && (*s | 0x20) <= 'f')
				d = (u32)((*s | 0x20) - 'a' + 10);
			else
				return v;
			v = v << 4 | d;
		}
	}
	for (; *s >= '0' && *s <= '9'; s++)
		v = v * 10 + (u64)(*s - '0');
	return v;
}

/* If word starts with "name=", return the value text. */
static const char *match(const char *word, const char *name)
{
	while (*name)
		if (*word++ != *name++)
			return 0;
	return *word == '=' ? word + 1 : 0;
}

/* The value of the first word "name=...", or 0. */
const char *cmdline_value(const char *s, const char *name)
{
	while (*s) {
		const char *v;

		while (*s == ' ')
			s++;
		v = match(s, name);
		if (v)
			return v;
		while (*s && *s != ' ')
			s++;
	}
	return 0;
}

void cmdline_parse(const char *s, struct kparams *kp)
{
	const char *s0 = s;

	*kp = (struct kparams){ .mem_mib = 16, .seed = 1, .rounds = 3, .cpus = 1, .verify = 1,
				.disk_blocks = 256, .disk_writes = 8, .disk_verify = 1 };
	while (*s) {
		while (*s == ' ')
			s++;
		for (u32 k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) {
			const char *v = match(s, keys[k].name);

			if (v)
				*(u64 *)((u8 *)kp + keys[k].offset) = parse_u64(v);
		}
		while (*s && *s != ' ')
			s++;
	}
	if (kp->cpus < 1)
		kp->cpus = 1;
	if (kp->cpus > MAX_CPUS)
		kp->cpus = MAX_CPUS;
	if (!kp->verify)
		kp->verify = 1;
	if (!kp->disk_verify)
		kp->disk_verify = 1;
	kp->exit_status &= 0xff;
	kp->net = cmdline_value(s0, "tg.ip") != 0;
	if (kp->disk_blocks > MAX_DISK_BLOCKS)
		kp->disk_blocks = MAX_DISK_BLOCKS;
}
