"""Snapshot storage: object store backends and the deduplicating Repository.

    backend = open_backend("/srv/repo" | "file:///srv/repo" | "s3://bucket/prefix" | "memory://x")
    repo = Repository.init(backend)  # or Repository.open(backend) / Repository.open_url(url)
    with repo.start_snapshot(parent=None) as w:
        w.put_region("ram0", size, memory)
        w.put_blob("state", state_bytes)
        info = w.commit(vm="web1")
"""

from snapvisor.store.backend import ObjectInfo, ObjectStore, open_backend
from snapvisor.store.errors import (CorruptObject, ObjectNotFound, RepositoryError,
                                    RepositoryLocked, StoreError)
from snapvisor.store.gc import GcResult
from snapvisor.store.manifest import SnapshotInfo
from snapvisor.store.pagehash import PAGE_SIZE
from snapvisor.store.reader import RegionReader, Snapshot
from snapvisor.store.repository import Repository
from snapvisor.store.retention import KeepPolicy, PruneResult
from snapvisor.store.verify import VerifyReport
from snapvisor.store.writer import SnapshotWriter

__all__ = [
    "PAGE_SIZE", "open_backend", "ObjectStore", "ObjectInfo", "Repository", "SnapshotWriter",
    "Snapshot", "SnapshotInfo", "RegionReader", "KeepPolicy", "PruneResult", "GcResult",
    "VerifyReport", "StoreError", "ObjectNotFound", "RepositoryError", "RepositoryLocked",
    "CorruptObject",
]
