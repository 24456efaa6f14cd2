"""Garbage collection: delete packs no snapshot references, under the exclusive lock.

Order, so that a crash at any point leaves a readable repository:
1. list manifests, then read the index, then list data/ (a manifest implies its
   index file and packs exist, since writers write packs, index, manifest);
2. write one new index file listing only the packs still in use;
3. delete the index files it replaces;
4. delete the unused packs (and packs no index lists: leftovers of dead writers).
Packs that are mostly garbage are repacked first: their live objects are checked
against their ids and written to new packs, which the new index lists instead.
A crash at any point leaves extra index entries or unindexed packs, which the next
gc removes; no step leaves an index entry pointing at a deleted pack.
Snapshot writers hold shared locks, so gc never runs while one is deduplicating
against the index it loaded.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from snapvisor.store import codec, pagehash
from snapvisor.store import format as fmt
from snapvisor.store.errors import CorruptObject, RepositoryError, SnapvisorError
from snapvisor.store.index import require_intact
from snapvisor.store.packer import Packer
from snapvisor.store.pagehash import ID_SIZE, PAGE_SIZE
from snapvisor.store.reachability import referenced_ids
from snapvisor.store.reader import current_progress, fetch_frames

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
    packs_repacked: int
    bytes_repacked: int     # written to new packs by repacking
    unused_bytes_kept: int  # estimated garbage left inside packs that are still in use
    leftovers_removed: int = 0  # of interrupted puts: temporary files, unfinished uploads
    # Snapshots whose manifest does not read (id -> why): a dry run reports what the
    # readable ones leave unused, and gc itself refuses to delete anything.
    unreadable_manifests: dict[str, str] = field(default_factory=dict)
    damaged_index_files: dict[str, str] = field(default_factory=dict)  # likewise (key -> why)


REPACK_BELOW = 0.5  # repack a pack once more than half of its bytes are garbage
LEFTOVER_AGE_S = 24 * 3600


def collect_garbage(repo: "Repository", dry_run: bool, repack_below: float = REPACK_BELOW
                    ) -> GcResult:
    store = repo.store
    manifests, unreadable = repo.read_manifests()
    if unreadable and not dry_run:
        # Its objects cannot be known, and deleting them would lose the snapshot for good.
        why = unreadable[min(unreadable)]
        raise RepositoryError(f"gc stopped, nothing deleted: {len(unreadable)} snapshot manifest(s) cannot be "
                              f"read, and gc cannot tell which data they use; {why}")
    index = repo.refresh_index(full=True)
    if not dry_run:
        require_intact(index, "gc")
    on_disk = {info.key: info.size for info in store.list(fmt.DATA_PREFIX)}

    try:
        live = referenced_ids(repo, manifests)
    except SnapvisorError as e:
        raise RepositoryError(f"gc stopped, nothing deleted: {e}") from None
    live_slots: dict[tuple[int, int], int] = {}
    for oid in live:
        loc = index.get(oid)
        if loc is None:
            raise RepositoryError(f"gc stopped, nothing deleted: object {oid.hex()} is referenced "
                                  f"but not indexed; run `snapvisor verify` first")
        live_slots[loc[:2]] = live_slots.get(loc[:2], 0) + 1
    live_packs = {p for p, _ in live_slots}
    for p in live_packs:
        if index.packs[p].key not in on_disk:
            raise RepositoryError(f"gc stopped, nothing deleted: pack {index.packs[p].key} is in "
                                  f"use but missing; run `snapvisor verify`")
    garbage = {p: _garbage_bytes(index.packs[p], p, live_slots) for p in live_packs}
    sparse = sorted(p for p in live_packs if garbage[p] > repack_below * index.packs[p].size)
    kept = sorted(live_packs - set(sparse))

    dead_indexed = [p for p in range(len(index.packs)) if p not in live_packs]
    indexed_keys = {pack.key for pack in index.packs}
    unindexed = [k for k in on_disk if k not in indexed_keys and fmt.pack_id_from_key(k)]
    doomed = [index.packs[p].key for p in dead_indexed + sparse] + unindexed
    result = GcResult(dry_run, len(manifests), len(kept), len(doomed),
                      sum(on_disk.get(k, 0) for k in doomed), 0, len(sparse), 0,
                      sum(garbage[p] for p in kept), unreadable_manifests=unreadable,
                      damaged_index_files=dict(index.damaged))
    if dry_run:
        return result

    moved = _repack(repo, index, live, sparse) if sparse else None
    if dead_indexed or sparse or len(index.files) > 1:
        new_key = _write_index(repo, index, kept, moved) if kept or moved else None
        old = sorted(k for k in index.files if k != new_key)
        for key in old:
            store.delete(key)
        result.index_files_replaced = len(old)
    progress = current_progress()
    progress.start(result.bytes_deleted)

    def delete(key: str) -> None:
        store.delete(key)
        progress.advance(on_disk.get(key, 0))

    with ThreadPoolExecutor(max_workers=repo.io_threads) as pool:
        list(pool.map(delete, doomed))
    if moved is not None:
        result.bytes_repacked = moved.bytes_written
    # Space that interrupted puts hold (no object lists it); a day old, so that no
    # put still running elsewhere is cut.
    result.leftovers_removed = store.sweep(LEFTOVER_AGE_S)
    repo.refresh_index(full=True)
    return result


def _garbage_bytes(pack, number: int, live_slots: dict[tuple[int, int], int]) -> int:
    """Stored bytes of a pack that no snapshot needs (page frames pro rata of live slots)."""
    total = 0
    for fno, frame in enumerate(pack.frames):
        used = live_slots.get((number, fno), 0)
        total += int(frame["clen"]) * (int(frame["items"]) - used) // int(frame["items"])
    return total


def _repack(repo: "Repository", index, live: set[bytes], sparse: list[int]) -> Packer:
    """Copy the live objects of `sparse` packs into new packs, checking each one."""
    wanted: dict[tuple[int, int], list[tuple[int, bytes]]] = {}
    sparse_set = set(sparse)
    for oid in live:
        p, fno, slot = index.entries[oid]
        if p in sparse_set:
            wanted.setdefault((p, fno), []).append((slot, oid))
    packer = Packer(repo.store, repo.pack_size, repo.io_threads, crypto=repo.crypto)
    try:
        for p in sparse:
            pack = index.packs[p]
            frames = sorted(f for q, f in wanted if q == p)
            for fno, raw in fetch_frames(repo, pack, frames):
                items = sorted(wanted[(p, fno)])
                if int(pack.frames[fno]["kind"]) == fmt.KIND_PAGES:
                    _move_pages(repo, packer, pack, fno, raw, items)
                else:
                    (_, oid), = items
                    if repo.crypto.object_id(raw) != oid:
                        raise CorruptObject(pack.key, f"frame {fno} does not hash to {oid.hex()}")
                    cdc, payload = codec.compress(raw, repo.zstd_level)
                    packer.add_frame(int(pack.frames[fno]["kind"]), cdc, payload, len(raw), oid)
        packer.finish()
    except SnapvisorError as e:
        raise RepositoryError(f"gc stopped, nothing deleted: {e}") from None
    finally:
        packer.close()
    return packer


def _move_pages(repo, packer: Packer, pack, fno: int, raw: bytes,
                items: list[tuple[int, bytes]]) -> None:
    slots = np.array([slot for slot, _ in items], dtype=np.uint32)
    ids = np.frombuffer(b"".join(oid for _, oid in items), np.uint8).reshape(-1, ID_SIZE)
    bad = pagehash.check_slots(raw, slots, ids, repo.crypto.id_key)
    if bad >= 0:
        raise CorruptObject(pack.key, f"frame {fno} slot {int(slots[bad])} does not hash to its id")
    pages = np.frombuffer(raw, np.uint8).reshape(-1, PAGE_SIZE)[slots]
    step = repo.frame_pages
    for start in range(0, len(pages), step):
        cdc, payload = codec.compress(pages[start:start + step], repo.zstd_level)
        packer.add_frame(fmt.KIND_PAGES, cdc, payload, len(pages[start:start + step]) * PAGE_SIZE,
                         ids[start:start + step].tobytes())


def _write_index(repo: "Repository", index, kept: list[int], moved: Packer | None) -> str:
    """One index file: the kept packs with their entries, plus the packs of `moved`."""
    number = {p: i for i, p in enumerate(kept)}
    packs = np.array([(index.packs[p].pack_id, index.packs[p].size, len(index.packs[p].frames))
                      for p in kept], dtype=fmt.PACK_RECORD_DTYPE)
    entries = np.array([(oid, number[p], fr, slot) for oid, (p, fr, slot) in index.entries.items()
                        if p in number], dtype=fmt.ENTRY_DTYPE)
    frames = [index.packs[p].frames for p in kept]
    if moved is not None and moved.packs:
        extra = moved.index_file()
        extra.entries["pack"] += len(kept)
        packs = np.concatenate([packs, extra.packs])
        frames += extra.frames
        entries = np.concatenate([entries, extra.entries])
    data = fmt.encode_index(fmt.IndexFile(packs, frames, entries), repo.crypto)
    key = fmt.index_key(data)
    repo.store.put(key, data)
    return key
