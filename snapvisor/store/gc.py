"""Garbage collection: delete packs no snapshot references, under the exclusive lock.

Order, so that a crash at any point leaves a readable repository:
1. list manifests, then read the index, then list data/ (a manifest implies its
   index file and packs exist, since writers write packs, index, manifest);
2. write one new index file listing only the packs still in use;
3. delete the index files it replaces;
4. delete the unused packs (and packs no index lists: leftovers of dead writers).
A crash after 2 or 3 leaves extra index entries or unindexed packs, which the
next gc removes; no step leaves an index entry pointing at a deleted pack.
Snapshot writers hold shared locks, so gc never runs while one is deduplicating
against the index it loaded.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from snapvisor.store import format as fmt
from snapvisor.store.errors import RepositoryError, SnapvisorError
from snapvisor.store.reachability import referenced_ids

if TYPE_CHECKING:
    from snapvisor.store.repository import Repository


@dataclass
class GcResult:
    dry_run: bool
    snapshots: int
    packs_kept: int
    packs_deleted: int
    bytes_deleted: int
    index_files_replaced: int
    unused_bytes_kept: int  # unreferenced frames inside packs that are still in use


def collect_garbage(repo: "Repository", dry_run: bool) -> GcResult:
    store = repo.store
    ids = repo.snapshot_ids()
    with ThreadPoolExecutor(max_workers=repo.io_threads) as pool:
        manifests = list(pool.map(repo._manifest, ids))
    index = repo.refresh_index(full=True)
    on_disk = {info.key: info.size for info in store.list(fmt.DATA_PREFIX)}

    try:
        live = referenced_ids(repo, manifests)
    except SnapvisorError as e:
        raise RepositoryError(f"gc stopped, nothing deleted: {e}") from None
    live_frames: set[tuple[int, int]] = set()
    for oid in live:
        loc = index.get(oid)
        if loc is None:
            raise RepositoryError(f"gc stopped, nothing deleted: object {oid.hex()} is referenced "
                                  f"but not indexed; run `snapvisor verify` first")
        live_frames.add((loc[0], loc[1]))
    live_packs = {p for p, _ in live_frames}
    for p in live_packs:
        if index.packs[p].key not in on_disk:
            raise RepositoryError(f"gc stopped, nothing deleted: pack {index.packs[p].key} is in "
                                  f"use but missing; run `snapvisor verify`")

    dead_indexed = [p for p in range(len(index.packs)) if p not in live_packs]
    indexed_keys = {pack.key for pack in index.packs}
    unindexed = [k for k in on_disk if k not in indexed_keys and fmt.pack_id_from_key(k)]
    doomed = [index.packs[p].key for p in dead_indexed] + unindexed
    unused = sum(int(f["clen"]) for p in live_packs for fno, f in enumerate(index.packs[p].frames)
                 if (p, fno) not in live_frames)
    result = GcResult(dry_run, len(manifests), len(live_packs), len(doomed),
                      sum(on_disk.get(k, 0) for k in doomed), 0, unused)
    if dry_run:
        return result

    if dead_indexed or len(index.files) > 1:
        new_key = _write_index(repo, index, sorted(live_packs)) if live_packs else None
        old = sorted(k for k in index.files if k != new_key)
        for key in old:
            store.delete(key)
        result.index_files_replaced = len(old)
    with ThreadPoolExecutor(max_workers=repo.io_threads) as pool:
        list(pool.map(store.delete, doomed))
    repo.refresh_index(full=True)
    return result


def _write_index(repo: "Repository", index, live_packs: list[int]) -> str:
    number = {p: i for i, p in enumerate(live_packs)}
    packs = np.array([(index.packs[p].pack_id, index.packs[p].size, len(index.packs[p].frames))
                      for p in live_packs], dtype=fmt.PACK_RECORD_DTYPE)
    entries = np.array([(oid, number[p], fr, slot) for oid, (p, fr, slot) in index.entries.items()
                        if p in number], dtype=fmt.ENTRY_DTYPE)
    data = fmt.encode_index(fmt.IndexFile(packs, [index.packs[p].frames for p in live_packs],
                                          entries))
    key = fmt.index_key(data)
    repo.store.put(key, data)
    return key
