"""Reading snapshots back: region page maps, ranged frame fetches, page verification.

Every page read is checked against its SHA-256 id before it is handed out, so a
damaged or forged pack cannot put wrong bytes into a restored guest.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from snapvisor.store import codec, pagehash
from snapvisor.store import format as fmt
from snapvisor.store.errors import CorruptObject, ObjectNotFound, RepositoryError, StoreError
from snapvisor.store.index import Index, PackInfo, require
from snapvisor.store.manifest import Manifest, RegionRef, SnapshotInfo
from snapvisor.store.pagehash import ID_SIZE, PAGE_SIZE

if TYPE_CHECKING:
    from snapvisor.store.repository import Repository

RANGE_GAP = 1 << 20      # merge frame reads whose gap is smaller than this
RANGE_MAX = 32 << 20     # but never fetch more than this in one request
TASK_BYTES = 4 << 20     # restore work unit: small enough to spread over threads


def plan_ranges(pack: PackInfo, frame_nos, max_bytes: int = RANGE_MAX) -> list[list[int]]:
    """Group a pack's frames into runs that one ranged read each can fetch."""
    frames = pack.frames
    order = sorted(set(frame_nos))
    groups: list[list[int]] = []
    start = end = 0
    for fno in order:
        fstart = int(frames[fno]["offset"])
        fend = fstart + int(frames[fno]["clen"])
        if groups and fstart - end <= RANGE_GAP and fend - start <= max_bytes:
            groups[-1].append(fno)
            end = max(end, fend)
        else:
            groups.append([fno])
            start, end = fstart, fend
    return groups


def fetch_frames(repo: "Repository", pack: PackInfo, frame_nos, max_bytes: int = RANGE_MAX):
    """Yield (frame_no, raw bytes) for the given frames of one pack, few requests."""
    frames = pack.frames
    for group in plan_ranges(pack, frame_nos, max_bytes):
        start = int(frames[group[0]]["offset"])
        end = max(int(frames[f]["offset"]) + int(frames[f]["clen"]) for f in group)
        data = read_pack_range(repo, pack, start, end - start)
        for fno in group:
            f = frames[fno]
            off = int(f["offset"]) - start
            payload = memoryview(data)[off:off + int(f["clen"])]
            try:
                raw = codec.decompress(int(f["codec"]), payload, int(f["rlen"]), f"frame {fno}")
            except ValueError as e:
                raise CorruptObject(pack.key, str(e)) from None
            yield fno, raw


def read_pack_range(repo: "Repository", pack: PackInfo, offset: int, length: int) -> bytes:
    try:
        return repo.store.get(pack.key, offset, length)
    except ObjectNotFound:
        raise RepositoryError(f"pack {pack.key} is missing from {repo.store.url} (listed by "
                              f"{pack.index_key}); the snapshots using it cannot be read: run "
                              f"`snapvisor verify` to list them") from None
    except StoreError as e:
        if "truncated" in str(e):
            raise CorruptObject(pack.key, f"truncated ({e})") from None
        raise


def read_object(repo: "Repository", object_id: bytes, what: str) -> bytes:
    """One whole non-page object (map block, region root, blob), hash-checked."""
    index = repo.index
    loc = require(index, object_id, what)
    pack, frame = index.frame(loc)
    for _, raw in fetch_frames(repo, pack, [loc[1]]):
        if fmt.sha256(raw) != object_id:
            raise CorruptObject(pack.key, f"frame {loc[1]} does not hash to {object_id.hex()} "
                                          f"({what})")
        return raw
    raise AssertionError("unreachable")


def read_objects(repo: "Repository", object_ids: list[bytes], what: str) -> dict[bytes, bytes]:
    """Many single-frame objects at once, grouped by pack, hash-checked."""
    index = repo.index
    unique = list(set(object_ids))
    locs = index.locate_many(np.frombuffer(b"".join(unique), dtype=np.uint8).reshape(-1, ID_SIZE)).tolist()
    by_pack: dict[int, dict[int, bytes]] = {}
    for oid, (pack_no, fno, _slot) in zip(unique, locs):
        if pack_no < 0:
            require(index, oid, what)  # raises the error that names the missing object
        by_pack.setdefault(pack_no, {})[fno] = oid
    out: dict[bytes, bytes] = {}

    def one_pack(pack_no: int) -> None:
        pack = index.packs[pack_no]
        wanted = by_pack[pack_no]
        for fno, raw in fetch_frames(repo, pack, list(wanted)):
            oid = wanted[fno]
            if fmt.sha256(raw) != oid:
                raise CorruptObject(pack.key, f"frame {fno} does not hash to {oid.hex()} ({what})")
            out[oid] = raw

    with ThreadPoolExecutor(max_workers=repo.io_threads) as pool:
        list(pool.map(one_pack, by_pack))
    return out


def load_page_map(repo: "Repository", block_pages: int, ref: RegionRef, what: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(block ids (nblocks, 32), page ids (npages, 32)) of a region; zero rows are zero."""
    npages = ref.size // PAGE_SIZE
    nblocks = -(-npages // block_pages)
    page_ids = np.zeros((npages, ID_SIZE), dtype=np.uint8)
    if ref.root == fmt.ZERO_ID:
        return np.zeros((nblocks, ID_SIZE), dtype=np.uint8), page_ids
    root = read_object(repo, ref.root, f"{what} region root")
    block_ids = fmt.decode_region_root(f"{what} region root {ref.root.hex()}", root, nblocks)
    ids_bytes = block_ids.tobytes()
    keys = [ids_bytes[i:i + ID_SIZE] for i in range(0, len(ids_bytes), ID_SIZE)]
    blocks = read_objects(repo, [k for k in keys if k != fmt.ZERO_ID], f"{what} page map")
    for b, key in enumerate(keys):
        if key == fmt.ZERO_ID:
            continue
        start = b * block_pages
        count = min(block_pages, npages - start)
        page_ids[start:start + count] = fmt.decode_map_block(
            f"{what} map block {key.hex()}", blocks[key], count)
    return block_ids.copy(), page_ids


class RegionReader:
    """Random and bulk access to one region of one snapshot."""

    CACHE_FRAMES = 32

    def __init__(self, repo: "Repository", manifest: Manifest, name: str):
        ref = manifest.region_refs[name]
        self._repo = repo
        self._what = f"snapshot {manifest.info.short_id} region {name!r}"
        self.name = name
        self.size = ref.size
        self.npages = ref.size // PAGE_SIZE
        _, self._ids = load_page_map(repo, manifest.map_block_pages, ref, self._what)
        self._nonzero = np.flatnonzero(self._ids.any(axis=1))
        self._locs = self._locate(repo.index)
        # Dense page -> row in _nonzero/_locs, -1 for zero pages.
        self._row = np.full(self.npages, -1, dtype=np.int64)
        self._row[self._nonzero] = np.arange(len(self._nonzero))
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._cache_lock = threading.Lock()

    def _locate(self, index: Index) -> np.ndarray:
        locs = index.locate_many(self._ids[self._nonzero])
        missing = np.flatnonzero(locs[:, 0] < 0)
        if len(missing):
            bad = int(missing[0])
            raise RepositoryError(
                f"{self._what}: page {int(self._nonzero[bad])} (id {self._ids[self._nonzero[bad]].tobytes().hex()}) "
                f"is not in the repository index (missing index file or pack); run "
                f"`snapvisor verify`")
        return locs

    def nonzero_pages(self) -> np.ndarray:
        return self._nonzero.copy()

    def _check_out(self, out, npages: int) -> memoryview:
        mv = memoryview(out).cast("B")
        if mv.readonly:
            raise RepositoryError(f"{self._what}: output buffer is read-only")
        if len(mv) < npages * PAGE_SIZE:
            raise RepositoryError(f"{self._what}: output buffer of {len(mv)} bytes is smaller "
                                  f"than {npages} pages")
        return mv

    def read_into(self, out, threads: int = 2) -> None:
        """Fill `out` (size bytes, already zero) with the region; zero pages are skipped."""
        mv = self._check_out(out, self.npages)
        self._read_rows(np.arange(len(self._nonzero)), self._nonzero, mv, threads)

    def read_pages_into(self, page_indices, out) -> None:
        """out[i] = page page_indices[i], zero pages included."""
        pages = np.asarray(page_indices, dtype=np.int64)
        if len(pages) and (pages.min() < 0 or pages.max() >= self.npages):
            raise RepositoryError(f"{self._what}: page index outside 0..{self.npages - 1}")
        mv = self._check_out(out, len(pages))
        rows = self._row[pages]
        zero = np.flatnonzero(rows < 0)
        if len(zero):
            view = np.frombuffer(mv, dtype=np.uint8)[:len(pages) * PAGE_SIZE].reshape(-1, PAGE_SIZE)
            view[zero] = 0
        data = np.flatnonzero(rows >= 0)
        self._read_rows(rows[data], data, mv, threads=self._repo.io_threads)

    def _read_rows(self, rows: np.ndarray, dest: np.ndarray, out: memoryview, threads: int) -> None:
        """Copy the pages of `rows` (rows of _locs) to page positions `dest` of `out`."""
        if not len(rows):
            return
        locs = self._locs[rows]
        order = np.lexsort((locs[:, 2], locs[:, 1], locs[:, 0]))
        locs, dest, rows = locs[order], dest[order], rows[order]
        ids = self._ids[self._nonzero[rows]]
        # Work units: runs of frames of one pack that one ranged read fetches.
        bounds = np.flatnonzero(np.diff(locs[:, 0] * (1 << 32) + locs[:, 1])) + 1
        starts = np.concatenate(([0], bounds)).tolist()
        ends = np.concatenate((bounds, [len(locs)])).tolist()
        rows_of: dict[tuple[int, int], tuple[int, int]] = {
            (int(locs[a, 0]), int(locs[a, 1])): (a, b) for a, b in zip(starts, ends)}
        tasks = []
        for pack_no in np.unique(locs[:, 0]).tolist():
            pack = self._repo.index.packs[pack_no]
            wanted = [f for p, f in rows_of if p == pack_no]
            tasks += [(pack_no, group) for group in plan_ranges(pack, wanted, TASK_BYTES)]

        def run(task: tuple[int, list[int]]) -> None:
            pack_no, group = task
            pack = self._repo.index.packs[pack_no]
            for fno, raw in fetch_frames(self._repo, pack, group, TASK_BYTES):
                a, b = rows_of[(pack_no, fno)]
                self._check_and_copy(pack, fno, raw, locs[a:b, 2], ids[a:b], dest[a:b], out)

        if threads <= 1 or len(tasks) == 1:
            for task in tasks:
                run(task)
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(run, tasks))

    def _check_and_copy(self, pack: PackInfo, fno: int, raw: bytes, slots: np.ndarray,
                        ids: np.ndarray, dest: np.ndarray, out) -> None:
        if int(slots.max()) * PAGE_SIZE >= len(raw):
            raise CorruptObject(pack.key, f"frame {fno} has no slot {int(slots.max())}")
        bad = pagehash.check_slots(raw, slots, ids)
        if bad >= 0:
            raise CorruptObject(pack.key, f"frame {fno} slot {int(slots[bad])} does not hash to "
                                          f"page id {ids[bad].tobytes().hex()} ({self._what})")
        pagehash.copy_pages(out, dest, raw, slots)

    def _frame(self, pack_no: int, fno: int) -> bytes:
        key = (pack_no, fno)
        with self._cache_lock:
            raw = self._cache.get(key)
            if raw is not None:
                self._cache.move_to_end(key)
                return raw
        pack = self._repo.index.packs[pack_no]
        for _, raw in fetch_frames(self._repo, pack, [fno]):
            with self._cache_lock:
                self._cache[key] = raw
                while len(self._cache) > self.CACHE_FRAMES:
                    self._cache.popitem(last=False)
            return raw
        raise AssertionError("unreachable")

    def read_page(self, index: int) -> bytes:
        """One page, for serving a page fault; recently used frames stay cached."""
        if not 0 <= index < self.npages:
            raise RepositoryError(f"{self._what}: page {index} outside 0..{self.npages - 1}")
        row = int(self._row[index])
        if row < 0:
            return bytes(PAGE_SIZE)
        pack_no, fno, slot = (int(x) for x in self._locs[row])
        raw = self._frame(pack_no, fno)
        page = raw[slot * PAGE_SIZE:(slot + 1) * PAGE_SIZE]
        if len(page) != PAGE_SIZE or fmt.sha256(page) != self._ids[index].tobytes():
            raise CorruptObject(self._repo.index.packs[pack_no].key,
                                f"frame {fno} slot {slot} does not match page {index} "
                                f"of {self._what}")
        return page


class Snapshot:
    def __init__(self, repo: "Repository", manifest: Manifest):
        self._repo = repo
        self.manifest = manifest
        self.info: SnapshotInfo = manifest.info
        self.regions: dict[str, int] = dict(manifest.info.regions)
        self.blob_names: list[str] = sorted(manifest.blob_ids)
        self._readers: dict[str, RegionReader] = {}
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        return self.info.id

    def region_reader(self, name: str) -> RegionReader:
        if name not in self.manifest.region_refs:
            raise RepositoryError(f"snapshot {self.info.short_id} has no region {name!r} "
                                  f"(it has: {', '.join(sorted(self.regions)) or 'none'})")
        with self._lock:
            reader = self._readers.get(name)
            if reader is None:
                reader = self._readers[name] = RegionReader(self._repo, self.manifest, name)
        return reader

    def read_region(self, name: str, offset: int, length: int) -> bytes:
        reader = self.region_reader(name)
        if offset < 0 or length < 0 or offset + length > reader.size:
            raise RepositoryError(f"snapshot {self.info.short_id} region {name!r}: bytes "
                                  f"{offset}..{offset + length} outside its {reader.size} bytes")
        if length == 0:
            return b""
        first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
        buf = bytearray((last - first + 1) * PAGE_SIZE)
        reader.read_pages_into(np.arange(first, last + 1), buf)
        start = offset - first * PAGE_SIZE
        return bytes(buf[start:start + length])

    def get_blob(self, name: str) -> bytes:
        oid = self.manifest.blob_ids.get(name)
        if oid is None:
            raise RepositoryError(f"snapshot {self.info.short_id} has no blob {name!r} "
                                  f"(it has: {', '.join(self.blob_names) or 'none'})")
        return read_object(self._repo, oid, f"snapshot {self.info.short_id} blob {name!r}")
