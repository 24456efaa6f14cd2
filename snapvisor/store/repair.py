"""Rebuilding the index from the packs (restic's `repair index`), under the exclusive lock.

The index is a derived structure: every pack carries its own frame table, and every
object id is the SHA-256 of the object, so the entries of a pack can be recomputed
by reading it. When index files are lost or damaged, the snapshots whose objects
they listed cannot be read ("not in the repository index") although their data is
intact; this makes them readable again.

Order, so that a crash at any point loses nothing: read every index file (damaged
ones are set aside), read every pack no readable index file lists and rebuild its
entries, write one new index file for those packs, and only then delete the damaged
index files. Packs whose own trailer is damaged cannot be indexed; they are
reported, and left in place.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from snapvisor.store import codec, pagehash
from snapvisor.store import format as fmt
from snapvisor.store.errors import CorruptObject, ObjectNotFound, RepositoryError

if TYPE_CHECKING:
    from snapvisor.store.repository import Repository


@dataclass
class RepairResult:
    dry_run: bool
    index_files_read: int = 0
    damaged_index_files: list[str] = field(default_factory=list)  # removed unless dry_run
    packs_reindexed: int = 0
    objects_reindexed: int = 0
    new_index_file: str | None = None
    unreadable_packs: list[str] = field(default_factory=list)  # with why, left in place


def repair_index(repo: "Repository", dry_run: bool) -> RepairResult:
    store = repo.store
    result = RepairResult(dry_run)
    indexed: set[bytes] = set()
    for info in store.list(fmt.INDEX_PREFIX):
        try:
            index_file = fmt.decode_index(info.key, store.get(info.key), repo.crypto)
        except ObjectNotFound:
            continue
        except (CorruptObject, RepositoryError):
            result.damaged_index_files.append(info.key)
            continue
        result.index_files_read += 1
        indexed.update(rec["pack_id"].tobytes() for rec in index_file.packs)
    orphans = [info.key for info in store.list(fmt.DATA_PREFIX)
               if (pid := fmt.pack_id_from_key(info.key)) is not None and pid not in indexed]

    with ThreadPoolExecutor(max_workers=repo.io_threads) as pool:
        rebuilt = list(pool.map(lambda key: _reindex_pack(repo, key), orphans))
    packs, frames, entries = [], [], []
    for key, outcome in zip(orphans, rebuilt):
        if isinstance(outcome, str):
            result.unreadable_packs.append(f"{key}: {outcome}")
            continue
        pack_frames, pack_entries = outcome
        pack_entries["pack"] = len(packs)
        packs.append((fmt.pack_id_from_key(key), store.head(key) or 0, len(pack_frames)))
        frames.append(pack_frames)
        entries.append(pack_entries)
    result.packs_reindexed = len(packs)
    result.objects_reindexed = sum(len(e) for e in entries)
    if dry_run:
        return result
    if packs:
        index_file = fmt.IndexFile(np.array(packs, dtype=fmt.PACK_RECORD_DTYPE), frames, np.concatenate(entries))
        data = fmt.encode_index(index_file, repo.crypto)
        result.new_index_file = fmt.index_key(data)
        if result.new_index_file in result.damaged_index_files:
            # The rebuilt file is the lost one, byte for byte: put-if-absent would
            # keep the damaged copy under its name. (A crash right here loses only
            # what running repair again rebuilds.)
            store.delete(result.new_index_file)
        store.put(result.new_index_file, data)
    for key in result.damaged_index_files:  # their packs are indexed again above
        if key != result.new_index_file:
            store.delete(key)
    repo.refresh_index(full=True)
    return result


def _reindex_pack(repo: "Repository", key: str) -> tuple[np.ndarray, np.ndarray] | str:
    """(frame table, entries with pack 0) of one pack, read whole; or why it cannot be."""
    try:
        data = repo.store.get(key)
        frames = fmt.decode_pack_trailer(key, data, repo.crypto)
    except (CorruptObject, ObjectNotFound) as e:
        return str(e)
    entries = []
    for number, frame in enumerate(frames):
        try:
            raw = codec.decompress_frame(frame, data, 0, number, repo.crypto, key)
        except ValueError as e:
            return f"frame {number} does not decompress ({e}); its objects are lost"
        if frame["kind"] == fmt.KIND_PAGES:
            ids, nonzero = pagehash.hash_pages(raw, repo.crypto.id_key)
            slots = np.flatnonzero(nonzero)  # zero pages are never stored, never looked up
        else:
            ids = np.frombuffer(repo.crypto.object_id(raw), dtype=np.uint8).reshape(1, -1)
            slots = np.zeros(1, dtype=np.int64)
        rows = np.zeros(len(slots), dtype=fmt.ENTRY_DTYPE)
        rows["id"] = np.frombuffer(ids[slots].tobytes(), dtype="V32")
        rows["frame"] = number
        rows["slot"] = slots
        entries.append(rows)
    return frames.copy(), np.concatenate(entries) if entries else np.zeros(0, dtype=fmt.ENTRY_DTYPE)
