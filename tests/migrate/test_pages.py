"""Page planning: what the sender sends for each page, checked by applying every
batch (encoded and decoded as on the wire) to a receiver-side copy, which must
end up equal to the sender's memory."""

from __future__ import annotations

import numpy as np
import pytest

from snapvisor.migrate.pages import Layout, PageBatch, ReceiverImage, apply_batch
from snapvisor.store.pagehash import PAGE_SIZE, hash_pages

PAGES = 96


class ArrayStaging:
    """Receiver pages in a plain array (the real receiver writes guest RAM and disk images)."""

    def __init__(self, layout: Layout) -> None:
        self.pages = np.zeros((layout.total_pages, PAGE_SIZE), dtype=np.uint8)

    def put(self, pages: np.ndarray, rows: np.ndarray) -> None:
        self.pages[pages] = rows

    def get(self, pages: np.ndarray) -> np.ndarray:
        return self.pages[pages].copy()


def send(image: ReceiverImage, staging: ArrayStaging, memory: np.ndarray, pages: np.ndarray,
         base: np.ndarray | None = None) -> dict[str, int]:
    in_round = np.zeros(len(memory), dtype=bool)
    in_round[pages] = True
    batch, counts = image.plan(pages, memory[pages].copy(), in_round)
    image.remember(batch)
    wire = bytearray(b"".join(bytes(part) for part in batch.encode()))
    received = PageBatch.decode(wire, len(memory), has_base=base is not None)
    apply_batch(received, staging, None if base is None else lambda at: staging.put(at, base[at]))
    return counts


def test_round_trip_skips_held_pages_and_copies_known_content() -> None:
    layout = Layout([("ram0", 64 * PAGE_SIZE), ("disk-vda", 32 * PAGE_SIZE)])
    rng = np.random.default_rng(7)
    memory = rng.integers(0, 256, (PAGES, PAGE_SIZE), dtype=np.uint8)
    memory[10:30] = 0
    image, staging = ReceiverImage(layout, None), ArrayStaging(layout)

    first = send(image, staging, memory, np.arange(PAGES))
    assert first == {"data": PAGES - 20, "copied": 0, "zero": 0, "base": 0, "unchanged": 20}
    # Rewritten with the same bytes, moved from elsewhere (across regions), zeroed, new:
    memory[70:75] = memory[0:5]  # disk blocks take contents RAM pages hold
    memory[40:42] = 0
    memory[50] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
    # 3 and 4 are dirty (rewritten unchanged) in this round, so they are not copy sources.
    dirty = np.array([3, 4, 40, 41, 50, 70, 71, 72, 73, 74])
    second = send(image, staging, memory, dirty)
    assert second == {"data": 3, "copied": 3, "zero": 2, "base": 0, "unchanged": 2}
    assert (staging.pages == memory).all()


def test_a_copy_source_rewritten_in_the_same_round_is_sent_as_data() -> None:
    layout = Layout([("ram0", PAGES * PAGE_SIZE)])
    memory = np.random.default_rng(8).integers(0, 256, (PAGES, PAGE_SIZE), dtype=np.uint8)
    image, staging = ReceiverImage(layout, None), ArrayStaging(layout)
    send(image, staging, memory, np.arange(PAGES))
    memory[60] = memory[5]
    memory[5] = 1  # the would-be source changes in this round
    counts = send(image, staging, memory, np.array([5, 60]))
    assert counts["copied"] == 0 and counts["data"] == 2
    assert (staging.pages == memory).all()


@pytest.mark.parametrize("id_key", [None, b"k" * 32], ids=["plain", "encrypted"])
def test_pages_equal_to_the_base_snapshot_go_as_references(id_key: bytes | None) -> None:
    """Also when the base is in an encrypted repository, whose page ids are keyed."""
    layout = Layout([("ram0", PAGES * PAGE_SIZE)])
    rng = np.random.default_rng(9)
    base = rng.integers(0, 256, (PAGES, PAGE_SIZE), dtype=np.uint8)
    memory = base.copy()
    memory[:8] = rng.integers(0, 256, (8, PAGE_SIZE), dtype=np.uint8)  # changed since the snapshot
    base_ids, _ = hash_pages(base, id_key)
    image, staging = ReceiverImage(layout, base_ids, id_key), ArrayStaging(layout)
    counts = send(image, staging, memory, np.arange(PAGES), base=base)
    assert counts == {"data": 8, "copied": 0, "zero": 0, "base": PAGES - 8, "unchanged": 0}
    assert (staging.pages == memory).all()
