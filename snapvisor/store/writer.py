"""SnapshotWriter: turns guest memory and state into packs, an index file and a manifest.

Pipeline per region: worker threads zero-test and hash batches of pages (C helper,
GIL released); the calling thread drops pages already in the repository or in this
snapshot; workers compress the new pages in frames; frames fill packs that upload
in the background. Commit writes the page maps, waits for every pack, then writes
the index file, then the manifest: a crash before the manifest leaves only
unreferenced data that gc removes.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np

from snapvisor.store import codec, pagehash
from snapvisor.store import format as fmt
from snapvisor.store.errors import RepositoryError
from snapvisor.store.gate import Gate
from snapvisor.store.locks import RepositoryLock
from snapvisor.store.manifest import (RegionRef, SnapshotInfo, check_name, encode_manifest,
                                      snapshot_key)
from snapvisor.store.packer import Packer
from snapvisor.store.pagehash import ID_SIZE, PAGE_SIZE
from snapvisor.store.reader import Snapshot, load_page_map

if TYPE_CHECKING:
    from snapvisor.store.repository import Repository

HASH_BATCH_PAGES = 4096  # 16 MiB per hashing task


class _Region:
    def __init__(self, size: int, block_pages: int):
        self.size = size
        self.npages = size // PAGE_SIZE
        self.ids = np.zeros((self.npages, ID_SIZE), dtype=np.uint8)
        nblocks = -(-self.npages // block_pages)
        # Blocks whose map must be rebuilt; the others keep `base_blocks` (from the parent).
        self.touched = np.ones(nblocks, dtype=bool)
        self.base_blocks: np.ndarray | None = None


class SnapshotWriter:
    def __init__(self, repo: "Repository", parent: Snapshot | None, lock: RepositoryLock,
                 threads: int):
        self._repo = repo
        self._parent = parent
        self._lock = lock
        self._threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="snapvisor-cpu")
        self._gate = Gate()  # hashing, compression and uploads run only while it is open
        self._packer = Packer(repo.store, repo.pack_size, repo.io_threads, gate=self._gate, crypto=repo.crypto)
        self._known = repo.index.entries  # ids already stored (dedup source)
        self._mine: set[bytes] = set()    # ids stored by this snapshot
        self._regions: dict[str, _Region] = {}
        self._blobs: dict[str, bytes] = {}
        self._done = False
        self.stats = {"bytes_in": 0, "bytes_new_compressed": 0, "pages_new": 0, "pages_dedup": 0,
                      "pages_zero": 0, "map_blocks_new": 0, "objects_written": 0,
                      "bytes_written": 0}

    # -- public API -------------------------------------------------------------

    def put_region(self, name: str, size: int, data, pages=None) -> None:
        self._check_open()
        check_name("region", name)
        if not isinstance(size, int) or size < 0 or size % PAGE_SIZE:
            raise RepositoryError(f"region {name!r}: size {size!r} is not a multiple of "
                                  f"{PAGE_SIZE}")
        src = memoryview(data).cast("B")
        npages = size // PAGE_SIZE
        if pages is None:
            if len(src) != size:
                raise RepositoryError(f"region {name!r}: data has {len(src)} bytes, size is {size}")
            dest = None
        else:
            dest = np.asarray(pages, dtype=np.int64)
            if dest.ndim != 1 or (len(dest) and (dest[0] < 0 or dest[-1] >= npages
                                                 or (np.diff(dest) <= 0).any())):
                raise RepositoryError(f"region {name!r}: pages must be sorted, unique page "
                                      f"indices in 0..{npages - 1}")
            if len(src) != len(dest) * PAGE_SIZE:
                raise RepositoryError(f"region {name!r}: data has {len(src)} bytes for "
                                      f"{len(dest)} pages ({len(dest) * PAGE_SIZE} expected)")
        region = self._region(name, size, incremental=pages is not None)
        if dest is None:
            region.touched[:] = True
        else:
            region.touched[np.unique(dest // self._repo.map_block_pages)] = True
        self.stats["bytes_in"] += len(src)
        try:
            self._store_pages(region, src, dest)
        except BaseException:
            # Some ids are already promised to this snapshot; it cannot be committed.
            self.abort()
            raise

    def put_blob(self, name: str, data: bytes) -> None:
        self._check_open()
        check_name("blob", name)
        raw = bytes(data)
        if len(raw) >= 1 << 32:
            raise RepositoryError(f"blob {name!r} is {len(raw)} bytes; blobs must be < 4 GiB")
        oid = self._repo.crypto.object_id(raw)
        self._blobs[name] = oid
        self.stats["bytes_in"] += len(raw)
        if self._is_new(oid):
            try:
                cdc, payload = codec.compress(raw, 3)
                self._packer.add_frame(fmt.KIND_BLOB, cdc, payload, len(raw), oid)
            except BaseException:
                self.abort()
                raise

    def commit(self, vm: str, tags=(), meta: dict | None = None, time: datetime | None = None) -> SnapshotInfo:
        """Write the snapshot; `time` (default: now) is when it was taken: a copy
        from another repository keeps the original's, which retention judges."""
        self._check_open()
        check_name("vm", vm)
        tags = [check_name("tag", t) for t in tags]
        meta = dict(meta or {})
        try:
            fmt.canonical_json(meta)
        except (TypeError, ValueError) as e:  # checked before any work: the writer stays open
            raise RepositoryError(f"snapshot meta must be JSON-serialisable plain data: {e}") \
                from None
        try:
            refs = {name: self._write_map(name, region) for name, region in self._regions.items()}
            self._packer.finish()
            store = self._repo.store
            if self._packer.packs:
                index_file = fmt.sorted_entries(self._packer.index_file())
                index_data = fmt.encode_index(index_file, self._repo.crypto)
                index_key = fmt.index_key(index_data)
                store.put(index_key, index_data)
                self._count_write(len(index_data))
                if self._repo.index_cache is not None:  # a restore on this host then skips decoding it
                    self._repo.index_cache.save(index_key, index_file, index_data)
            time = time or datetime.now(timezone.utc)
            manifest = encode_manifest(
                vm=vm, time=time, tags=tags,
                parent=self._parent.id if self._parent else None, meta=meta,
                map_block_pages=self._repo.map_block_pages, regions=refs, blobs=self._blobs)
            manifest = self._repo.crypto.seal(manifest, fmt.MANIFEST_CONTEXT)
            snapshot_id = fmt.sha256(manifest).hex()  # of the stored bytes, like index files
            store.put(snapshot_key(snapshot_id), manifest)
            self._count_write(len(manifest))
        except BaseException:
            self.abort()
            raise
        self.stats["objects_written"] += self._packer.objects_written
        self.stats["bytes_written"] += self._packer.bytes_written
        self._finish()
        self._repo._mark_index_stale()
        return SnapshotInfo(snapshot_id, time, vm, tags, self._parent.id if self._parent else None,
                            meta, {n: r.size for n, r in refs.items()},
                            sorted(self._blobs))

    def held_back(self) -> AbstractContextManager[None]:
        """A context in which none of this writer's background work (hashing,
        compression, uploads) runs: what is running finishes on entry, the rest
        waits for the exit. For a VM's pause, which it would lengthen."""
        return self._gate.closed()

    def abort(self) -> None:
        """Drop the snapshot; packs already uploaded stay unreferenced until gc."""
        if not self._done:
            self._finish()

    def __enter__(self) -> "SnapshotWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()

    # -- internals ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._done:
            raise RepositoryError("this snapshot writer is already committed or aborted")

    def _finish(self) -> None:
        self._done = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._packer.close()
        self._lock.release()

    def _count_write(self, nbytes: int) -> None:
        self.stats["objects_written"] += 1
        self.stats["bytes_written"] += nbytes

    def _is_new(self, oid: bytes) -> bool:
        if oid in self._known or oid in self._mine:
            return False
        self._mine.add(oid)
        return True

    def _region(self, name: str, size: int, incremental: bool) -> _Region:
        region = self._regions.get(name)
        if region is not None:
            if region.size != size:
                raise RepositoryError(f"region {name!r} was put with size {region.size}, now {size}")
            return region
        region = _Region(size, self._repo.map_block_pages)
        parent = self._parent
        if incremental and parent is not None and name in parent.manifest.region_refs:
            ref = parent.manifest.region_refs[name]
            if ref.size != size:
                raise RepositoryError(
                    f"region {name!r}: parent snapshot {parent.info.short_id} has it with "
                    f"{ref.size} bytes, not {size}; write the whole region (pages=None)")
            if parent.manifest.map_block_pages != self._repo.map_block_pages:
                raise RepositoryError(f"parent snapshot {parent.info.short_id} uses another map "
                                      f"block size; write the whole region (pages=None)")
            region.base_blocks, region.ids = load_page_map(
                self._repo, parent.manifest.map_block_pages, ref,
                f"parent snapshot {parent.info.short_id} region {name!r}")
            region.touched[:] = False
        self._regions[name] = region
        return region

    def _store_pages(self, region: _Region, src: memoryview, dest: np.ndarray | None) -> None:
        npages = len(src) // PAGE_SIZE
        if npages == 0:
            return
        pages = np.frombuffer(src, dtype=np.uint8).reshape(npages, PAGE_SIZE)
        batches = deque(range(0, npages, HASH_BATCH_PAGES))
        hashing: deque[tuple[int, Future]] = deque()
        compressing: deque[tuple[Future, bytes, int]] = deque()
        frame_pages = self._repo.frame_pages
        level = self._repo.zstd_level

        def hash_ahead() -> None:
            # A short look-ahead keeps compression of earlier batches interleaved with
            # hashing of later ones, so packs fill and upload from the start.
            while batches and len(hashing) <= self._threads:
                start = batches.popleft()
                hashing.append((start, self._pool.submit(
                    self._gate.run, pagehash.hash_pages, pages[start:start + HASH_BATCH_PAGES],
                    self._repo.crypto.id_key)))

        hash_ahead()
        while hashing:
            start, fut = hashing.popleft()
            ids, nonzero = fut.result()
            count = len(ids)
            if dest is None:
                region.ids[start:start + count] = ids
            else:
                region.ids[dest[start:start + count]] = ids
            nz = np.flatnonzero(nonzero)
            self.stats["pages_zero"] += count - len(nz)
            new_rows = nz[self._select_new(ids[nz])]
            self.stats["pages_dedup"] += len(nz) - len(new_rows)
            self.stats["pages_new"] += len(new_rows)
            for f in range(0, len(new_rows), frame_pages):
                rows = new_rows[f:f + frame_pages]
                job = self._pool.submit(self._gate.run, _compress_pages, pages, rows + start, level)
                compressing.append((job, ids[rows].tobytes(), len(rows)))
            hash_ahead()
            while compressing and (compressing[0][0].done() or len(compressing) > 64):
                self._add_page_frame(*compressing.popleft())
        while compressing:
            self._add_page_frame(*compressing.popleft())

    def _select_new(self, ids: np.ndarray) -> np.ndarray:
        """Positions of the ids (rows of 32 bytes) that are neither stored nor already
        promised by this snapshot, first occurrence only; marks them promised."""
        keys = np.ascontiguousarray(ids).view("V32").ravel().tolist()
        known = np.fromiter(map(self._known.__contains__, keys), dtype=bool, count=len(keys))
        candidates = np.flatnonzero(~known)
        fresh = [keys[i] for i in candidates.tolist()]
        if self._mine:
            mine = np.fromiter(map(self._mine.__contains__, fresh), dtype=bool, count=len(fresh))
            candidates, fresh = candidates[~mine], list(itertools.compress(fresh, ~mine))
        unique = dict.fromkeys(fresh)
        if len(unique) != len(fresh):  # the same page twice in this batch: keep the first
            first: dict[bytes, int] = {}
            for pos, key in zip(candidates.tolist(), fresh):
                first.setdefault(key, pos)
            candidates = np.fromiter(first.values(), dtype=np.int64, count=len(first))
        self._mine.update(unique)
        return candidates

    def _add_page_frame(self, job: Future, ids: bytes, count: int) -> None:
        cdc, payload = job.result()
        self.stats["bytes_new_compressed"] += len(payload)
        self._packer.add_frame(fmt.KIND_PAGES, cdc, payload, count * PAGE_SIZE, ids)

    def _write_map(self, name: str, region: _Region) -> RegionRef:
        block_pages = self._repo.map_block_pages
        nblocks = len(region.touched)
        blocks = (region.base_blocks.copy() if region.base_blocks is not None
                  else np.zeros((nblocks, ID_SIZE), dtype=np.uint8))
        nonzero = region.ids.any(axis=1)
        padded = np.zeros(nblocks * block_pages, dtype=bool)
        padded[:region.npages] = nonzero
        per_block = padded.reshape(nblocks, block_pages)
        bitmaps = np.packbits(per_block, axis=1, bitorder="little")
        counts = per_block.sum(axis=1)
        ends = np.cumsum(counts) * ID_SIZE
        all_ids = region.ids[nonzero].tobytes()
        for b in np.flatnonzero(region.touched & (counts > 0)).tolist():
            npages = min(block_pages, region.npages - b * block_pages)
            data = b"".join((fmt.COUNT.pack(npages), bitmaps[b, :(npages + 7) // 8].tobytes(),
                             all_ids[ends[b] - counts[b] * ID_SIZE:ends[b]]))
            oid = self._repo.crypto.object_id(data)
            blocks[b] = np.frombuffer(oid, dtype=np.uint8)
            if oid not in self._known and oid not in self._mine:
                self._mine.add(oid)
                self.stats["map_blocks_new"] += 1
                self._packer.add_frame(fmt.KIND_MAP_BLOCK, codec.CODEC_RAW, data, len(data), oid)
        blocks[region.touched & (counts == 0)] = 0
        if not blocks.any():
            return RegionRef(region.size, fmt.ZERO_ID)
        root = blocks.tobytes()
        root_id = self._repo.crypto.object_id(root)
        if self._is_new(root_id):
            cdc, payload = codec.compress(root, 3)
            self._packer.add_frame(fmt.KIND_REGION_ROOT, cdc, payload, len(root), root_id)
        return RegionRef(region.size, root_id)


_gather = threading.local()


def _compress_pages(pages: np.ndarray, rows: np.ndarray, level: int) -> tuple[int, bytes]:
    # Gather into a per-thread buffer: a fresh 256 KiB array per frame would page-fault.
    buf = getattr(_gather, "buf", None)
    if buf is None or len(buf) < len(rows):
        buf = _gather.buf = np.empty((max(len(rows), 64), PAGE_SIZE), dtype=np.uint8)
    frame = buf[:len(rows)]
    np.take(pages, rows, axis=0, out=frame)
    return codec.compress(frame, level)
