/* The host-side peer of bench/disk.py: fio-style 4 KiB pwrite()s to a file,
 * in order or at pseudo-random block offsets, through the page cache like the
 * VMM's own writes. Prints the elapsed seconds.
 *
 *   disk_pwrite FILE seq|rand BLOCKS COUNT
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

int main(int argc, char **argv)
{
	static uint64_t buf[512];
	struct timespec t0, t1;

	if (argc != 5 || (strcmp(argv[2], "seq") && strcmp(argv[2], "rand"))) {
		fprintf(stderr, "usage: %s FILE seq|rand BLOCKS COUNT\n", argv[0]);
		return 2;
	}
	int fd = open(argv[1], O_WRONLY);
	int random = !strcmp(argv[2], "rand");
	uint64_t blocks = strtoull(argv[3], 0, 10), count = strtoull(argv[4], 0, 10);

	if (fd < 0 || !blocks) {
		perror(argv[1]);
		return 1;
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (uint64_t i = 0; i < count; i++) {
		uint64_t block = random ? mix64(i) % blocks : i % blocks;

		for (int w = 0; w < 512; w++) /* fresh data per block, as the guest writes */
			buf[w] = mix64(i * 512 + w);
		if (pwrite(fd, buf, sizeof(buf), (off_t)(block * sizeof(buf))) != sizeof(buf)) {
			perror("pwrite");
			return 1;
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("%.6f\n", (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
	return 0;
}
