"""Helpers shared by the store tests: small synthetic guest images and readers."""

import numpy as np

from snapvisor.store import PAGE_SIZE

SMALL_REPO = {"pack_size": 1 << 18, "frame_pages": 16, "map_block_pages": 16}
TEST_PASSWORD = "correct horse battery staple"  # of the encrypted `repo` fixture (unused by plain ones)


def make_memory(npages: int, seed: int = 0) -> np.ndarray:
    """A small guest image: zero pages, random pages, compressible pages, repeated pages."""
    rng = np.random.default_rng(seed)
    mem = np.zeros((npages, PAGE_SIZE), dtype=np.uint8)
    kinds = rng.integers(0, 4, npages)
    rand = kinds == 1
    mem[rand] = rng.integers(0, 256, (int(rand.sum()), PAGE_SIZE), dtype=np.uint8)
    text = kinds == 2
    mem[text] = np.frombuffer((b"snapvisor page %d " * 400)[:PAGE_SIZE], np.uint8)
    mem[text, :8] = rng.integers(0, 256, (int(text.sum()), 8), dtype=np.uint8)
    same = kinds == 3
    mem[same] = 0xAB  # identical pages: stored once
    return mem.reshape(-1)


def read_all(snapshot, region: str) -> bytes:
    reader = snapshot.region_reader(region)
    out = bytearray(reader.size)
    reader.read_into(out)
    return bytes(out)


def object_listing(store) -> dict[str, int]:
    return {o.key: o.size for o in store.list("") if not o.key.startswith("locks/")}

