"""Copying snapshots between repositories (`snapvisor copy`): local to S3 for an
off-site copy, unencrypted to encrypted.

Each snapshot is read from the source, every page checked against its id there,
and written into the destination as a new snapshot, which deduplicates against
what the destination holds: only the pages it lacks are uploaded. Page ids are
recomputed on the way (an encrypted repository has its own id key), so no id
crosses from one repository to the other. The copy keeps the snapshot's VM, time,
tags and meta, and records where it came from in `meta.copied_from`; a copy run
again (after an interruption, or on a schedule) skips the snapshots already
there, so it resumes at the first snapshot not yet committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from snapvisor.store.pagehash import PAGE_SIZE
from snapvisor.store.reader import Snapshot
from snapvisor.store.repository import Repository

CHUNK_PAGES = 4096  # 16 MiB read from the source and handed to the writer at a time


@dataclass
class CopyResult:
    copied: dict[str, str] = field(default_factory=dict)   # source id -> destination id
    skipped: dict[str, str] = field(default_factory=dict)  # already there: source id -> destination id
    bytes_read: int = 0
    bytes_written: int = 0
    pages_new: int = 0


def copied_from(info_meta: dict) -> tuple[str, str] | None:
    origin = info_meta.get("copied_from")
    if isinstance(origin, dict) and isinstance(origin.get("repository"), str) and isinstance(origin.get("snapshot"), str):
        return origin["repository"], origin["snapshot"]
    return None


def copy_snapshots(source: Repository, dest: Repository, snapshot_ids: list[str]) -> CopyResult:
    """Copy the given snapshots (full ids of `source`), oldest first."""
    result = CopyResult()
    present = {origin[1]: info.id for info in dest.list_snapshots()
               if (origin := copied_from(info.meta)) is not None and origin[0] == source.config["id"]}
    snapshots = sorted((source.get_snapshot(i) for i in snapshot_ids), key=lambda s: (s.info.time, s.id))
    for snapshot in snapshots:
        if snapshot.id in present:
            result.skipped[snapshot.id] = present[snapshot.id]
            continue
        result.copied[snapshot.id] = _copy_one(snapshot, source, dest, result)
    return result


def _copy_one(snapshot: Snapshot, source: Repository, dest: Repository, result: CopyResult) -> str:
    info = snapshot.info
    with dest.start_snapshot() as writer:
        for name in sorted(snapshot.regions):
            reader = snapshot.region_reader(name)
            pages = reader.nonzero_pages()
            buffer = bytearray(min(len(pages), CHUNK_PAGES) * PAGE_SIZE)
            for start in range(0, len(pages), CHUNK_PAGES):
                chunk = pages[start:start + CHUNK_PAGES]
                view = memoryview(buffer)[:len(chunk) * PAGE_SIZE]
                reader.read_pages_into(chunk, view)  # each page checked against its source id
                writer.put_region(name, reader.size, view, pages=chunk)
                result.bytes_read += len(view)
            if not len(pages):
                writer.put_region(name, reader.size, b"", pages=np.zeros(0, dtype=np.int64))
        for name in snapshot.blob_names:
            writer.put_blob(name, snapshot.get_blob(name))
        meta = {**info.meta, "copied_from": {"repository": source.config["id"], "snapshot": info.id}}
        copy = writer.commit(info.vm, tags=info.tags, meta=meta, time=info.time)
        result.bytes_written += writer.stats["bytes_written"]
        result.pages_new += writer.stats["pages_new"]
    return copy.id
