"""The in-memory index: look-ups over several index files (the largest as the base,
the others merged in), written sorted or not, with ids that share their first 8
bytes (a guest chooses its pages' contents, so it can make such pairs)."""

from __future__ import annotations

import numpy as np

from snapvisor.store import format as fmt
from snapvisor.store.index import Index


def index_file(ids: np.ndarray, pack_id: bytes, sort: bool) -> fmt.IndexFile:
    frames = np.zeros(1, dtype=fmt.FRAME_DTYPE)
    frames["items"], frames["rlen"], frames["clen"] = len(ids), len(ids) * 4096, 1
    entries = np.zeros(len(ids), dtype=fmt.ENTRY_DTYPE)
    entries["id"] = np.frombuffer(ids.tobytes(), dtype="V32")
    entries["slot"] = np.arange(len(ids))
    packs = np.array([(pack_id, 1 << 20, 1)], dtype=fmt.PACK_RECORD_DTYPE)
    made = fmt.IndexFile(packs, [frames], entries)
    return fmt.sorted_entries(made) if sort else made


def test_lookups_across_files_sorted_or_not():
    rng = np.random.default_rng(5)
    sizes = [5000, 300, 40, 1]
    files = [rng.integers(0, 256, (n, 32), dtype=np.uint8) for n in sizes]
    # Ids that differ only after their first 8 bytes, in different files.
    files[1][0, :8] = files[0][7, :8]
    files[2][0, :8] = files[0][7, :8]
    index = Index()
    for number, ids in enumerate(files):
        index.add_file(f"index/{number}", index_file(ids, bytes([number]) * 16, sort=number != 2))
    wanted = np.concatenate(files)
    locations = index.locate_many(wanted)
    expected_pack = np.repeat(np.arange(len(files)), sizes)
    expected_slot = np.concatenate([np.arange(n) for n in sizes])
    assert (locations[:, 0] == expected_pack).all()
    assert (locations[:, 2] == expected_slot).all()
    unknown = rng.integers(0, 256, (10, 32), dtype=np.uint8)
    unknown[0, :8] = files[0][7, :8]  # a prefix that exists, an id that does not
    assert (index.locate_many(unknown) == -1).all()
    assert index.get(files[3][0].tobytes()) == (3, 0, 0)


def test_small_lookups_before_the_merge_agree_with_it():
    rng = np.random.default_rng(6)
    files = [rng.integers(0, 256, (n, 32), dtype=np.uint8) for n in (5000, 200, 7)]
    files[2][0, :8] = files[0][1, :8]
    index = Index()
    for number, ids in enumerate(files):
        index.add_file(f"index/{number}", index_file(ids, bytes([number]) * 16, sort=True))
    wanted = np.concatenate(files)
    small = np.concatenate([index.locate_many(wanted[i:i + 64]) for i in range(0, len(wanted), 64)])
    assert index._merged is None  # every look-up was small: no merge yet
    assert (small == index.locate_many(wanted)).all() and index._merged is not None
    assert (small[:, 0] == np.repeat(np.arange(3), [5000, 200, 7])).all()
