"""Page-granular chunking helpers for the capture side.

The repository stores guest memory as 4 KiB pages (see docs/format.md); capture
turns KVM's dirty bitmap into the sorted page indices `SnapshotWriter.put_region`
takes, and gathers those pages from guest memory without a Python loop per page.
"""

from __future__ import annotations

import numpy as np

from snapvisor.store import PAGE_SIZE
from snapvisor.store.pagehash import hash_pages

__all__ = ["PAGE_SIZE", "pages_from_dirty_bitmap", "gather_pages", "nonzero_pages", "hash_pages"]


def pages_from_dirty_bitmap(bitmap, npages: int) -> np.ndarray:
    """Sorted int64 page indices whose bit is set in a KVM dirty bitmap.

    KVM_GET_DIRTY_LOG fills an array of 64-bit words, bit i of word w standing for
    page 64*w + i (little-endian bit order within each word).
    """
    words = np.frombuffer(memoryview(bitmap).cast("B"), dtype="<u8")
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:npages]
    return np.flatnonzero(bits).astype(np.int64)


def gather_pages(memory, pages: np.ndarray) -> np.ndarray:
    """A contiguous copy of the listed pages of `memory` (len(pages) * PAGE_SIZE bytes)."""
    view = np.frombuffer(memoryview(memory).cast("B"), dtype=np.uint8).reshape(-1, PAGE_SIZE)
    return view[np.asarray(pages, dtype=np.int64)]


def nonzero_pages(memory) -> np.ndarray:
    """Indices of the pages of `memory` that hold any non-zero byte."""
    mv = memoryview(memory).cast("B")
    words = np.frombuffer(mv, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
    return np.flatnonzero(words.any(axis=1)).astype(np.int64)
