"""Reading snapshots back: region page maps, ranged frame fetches, page verification.

Every page read is checked against its SHA-256 id before it is handed out, so a
damaged or forged pack cannot put wrong bytes into a restored guest.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Iterator, Protocol

import numpy as np

from snapvisor.store import codec, pagehash
from snapvisor.store import format as fmt
from snapvisor.store.errors import CorruptObject, ObjectNotFound, RepositoryError, StoreError
from snapvisor.store.index import PackInfo, not_indexed, require
from snapvisor.store.manifest import Manifest, RegionRef, SnapshotInfo
from snapvisor.store.pagehash import ID_SIZE, PAGE_SIZE

if TYPE_CHECKING:
    from snapvisor.store.repository import Repository

RANGE_GAP = 1 << 20      # merge frame reads whose gap is smaller than this
RANGE_MAX = 32 << 20     # but never fetch more than this in one request
TASK_BYTES = 4 << 20     # restore work unit: small enough to spread over threads


class Progress(Protocol):
    """Where long work (a restore's reads, verify --read-data, gc's deletes) says
    how far it is; humanize.Activity draws it."""

    def start(self, total: int) -> None:
        """The work from here on is `total` bytes."""

    def advance(self, n: int) -> None:
        """`n` more bytes done; called from worker threads."""


class _Quiet:
    def start(self, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


# A context variable, not a parameter: the work is reached through layers that
# have no use for one (image.restore, Repository.verify and gc).
_progress: ContextVar[Progress] = ContextVar("progress", default=_Quiet())


@contextmanager
def reporting_progress(progress: Progress | None) -> Iterator[None]:
    """Long work in this context (this thread) reports to `progress` in the block."""
    token = _progress.set(progress or _Quiet())
    try:
        yield
    finally:
        _progress.reset(token)


def current_progress() -> Progress:
    return _progress.get()


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


def fetch_frames(repo: "Repository", pack: PackInfo, frame_nos, max_bytes: int = RANGE_MAX, what: str = ""):
    """Yield (frame_no, raw bytes) for the given frames of one pack, few requests.
    `what` (a snapshot's region, say) is named in errors: what needed the frames."""
    frames = pack.frames
    for group in plan_ranges(pack, frame_nos, max_bytes):
        start = int(frames[group[0]]["offset"])
        end = max(int(frames[f]["offset"]) + int(frames[f]["clen"]) for f in group)
        data = read_pack_range(repo, pack, start, end - start, what)
        for fno in group:
            try:
                raw = codec.decompress_frame(frames[fno], data, start, fno, repo.crypto, pack.key)
            except ValueError as e:
                raise CorruptObject(pack.key, f"{e}{f' ({what})' if what else ''}") from None
            yield fno, raw


def read_pack_range(repo: "Repository", pack: PackInfo, offset: int, length: int, what: str = "") -> bytes:
    try:
        return repo.store.get(pack.key, offset, length)
    except ObjectNotFound:
        raise RepositoryError(f"pack {pack.key} is missing from {repo.store.url} (listed by "
                              f"{pack.index_key}{', needed by ' + what if what else ''}); the snapshots "
                              f"using it cannot be read: run `snapvisor verify` to list them") from None
    except StoreError as e:
        if "truncated" in str(e):
            raise CorruptObject(pack.key, f"truncated ({e}){f' ({what})' if what else ''}") from None
        raise


def read_object(repo: "Repository", object_id: bytes, what: str) -> bytes:
    """One whole non-page object (map block, region root, blob), hash-checked."""
    index = repo.index
    loc = require(index, object_id, what)
    pack, frame = index.frame(loc)
    for _, raw in fetch_frames(repo, pack, [loc[1]], what=what):
        if repo.crypto.object_id(raw) != object_id:
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
        for fno, raw in fetch_frames(repo, pack, list(wanted), what=what):
            oid = wanted[fno]
            if repo.crypto.object_id(raw) != oid:
                raise CorruptObject(pack.key, f"frame {fno} does not hash to {oid.hex()} ({what})")
            out[oid] = raw

    with ThreadPoolExecutor(max_workers=repo.io_threads) as pool:
        list(pool.map(one_pack, by_pack))
    return out


def load_region_root(repo: "Repository", block_pages: int, ref: RegionRef, what: str) -> np.ndarray:
    """The (nblocks, 32) map block ids of a region; zero rows for all-zero blocks."""
    nblocks = -(-(ref.size // PAGE_SIZE) // block_pages)
    if ref.root == fmt.ZERO_ID:
        return np.zeros((nblocks, ID_SIZE), dtype=np.uint8)
    root = read_object(repo, ref.root, f"{what} region root")
    return fmt.decode_region_root(f"{what} region root {ref.root.hex()}", root, nblocks).copy()


def load_map_blocks(repo: "Repository", block_pages: int, block_ids: np.ndarray, blocks: np.ndarray,
                    page_ids: np.ndarray, what: str) -> None:
    """Decode map blocks `blocks` (numbers into `block_ids`) into their rows of `page_ids`."""
    keys = [block_ids[b].tobytes() for b in blocks.tolist()]
    objects = read_objects(repo, [k for k in keys if k != fmt.ZERO_ID], f"{what} page map")
    npages = len(page_ids)
    for b, key in zip(blocks.tolist(), keys):
        start = b * block_pages
        count = min(block_pages, npages - start)
        if key == fmt.ZERO_ID:
            page_ids[start:start + count] = 0
            continue
        page_ids[start:start + count] = fmt.decode_map_block(
            f"{what} map block {key.hex()}", objects[key], count)


def load_page_map(repo: "Repository", block_pages: int, ref: RegionRef, what: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(block ids (nblocks, 32), page ids (npages, 32)) of a region; zero rows are zero."""
    block_ids = load_region_root(repo, block_pages, ref, what)
    page_ids = np.zeros((ref.size // PAGE_SIZE, ID_SIZE), dtype=np.uint8)
    data_blocks = np.flatnonzero(block_ids.any(axis=1))
    load_map_blocks(repo, block_pages, block_ids, data_blocks, page_ids, what)
    return block_ids, page_ids


class RegionReader:
    """Random and bulk access to one region of one snapshot.

    Opening one reads only the region root. A map block is read, and its pages
    looked up in the index, when a read first needs one of its pages: a lazy
    restore starts without waiting for the page map of all of memory.
    """

    def __init__(self, repo: "Repository", manifest: Manifest, name: str):
        ref = manifest.region_refs[name]
        self._repo = repo
        self._what = f"snapshot {manifest.info.short_id} region {name!r}"
        self.name = name
        self.size = ref.size
        self.npages = ref.size // PAGE_SIZE
        self._block_pages = manifest.map_block_pages
        self._block_ids = load_region_root(repo, self._block_pages, ref, self._what)
        self._ids = np.zeros((self.npages, ID_SIZE), dtype=np.uint8)
        # Both start as untouched zero memory (calloc): a 1 GiB region costs nothing
        # until its blocks are resolved.
        self._locs = np.zeros((self.npages, 3), dtype=np.int64)  # (pack, frame, slot)
        self._has_data = np.zeros(self.npages, dtype=bool)  # located non-zero page
        self._resolved = ~self._block_ids.any(axis=1)  # all-zero blocks need no map block
        self._resolve_lock = threading.Lock()

    def _resolve(self, blocks: np.ndarray) -> None:
        """Read the map blocks `blocks` and locate their pages, once."""
        if self._resolved[blocks].all():
            return
        with self._resolve_lock:
            todo = np.unique(blocks[~self._resolved[blocks]])
            if not len(todo):
                return
            load_map_blocks(self._repo, self._block_pages, self._block_ids, todo, self._ids, self._what)
            pages = (todo[:, None] * self._block_pages + np.arange(self._block_pages)).ravel()
            pages = pages[pages < self.npages]
            pages = pages[self._ids[pages].any(axis=1)]
            locs = self._repo.index.locate_many(self._ids[pages])
            missing = np.flatnonzero(locs[:, 0] < 0)
            if len(missing):
                page = int(pages[missing[0]])
                raise not_indexed(f"{self._what}: page {page} (id {self._ids[page].tobytes().hex()})",
                                  self._repo.index)
            self._locs[pages] = locs
            self._has_data[pages] = True
            self._resolved[todo] = True

    def _resolve_pages(self, pages: np.ndarray) -> None:
        if len(pages):
            self._resolve(np.unique(pages // self._block_pages))

    def data_blocks(self, block_pages: int) -> np.ndarray:
        """One bool per `block_pages` pages: False where every page is known to be zero
        (from the region root alone, without reading map blocks)."""
        nblocks = -(-self.npages // block_pages)
        with_data = np.flatnonzero(self._block_ids.any(axis=1))
        first_page = with_data * self._block_pages
        last_page = np.minimum(first_page + self._block_pages, self.npages) - 1
        edges = np.zeros(nblocks + 1, dtype=np.int64)
        np.add.at(edges, first_page // block_pages, 1)
        np.add.at(edges, last_page // block_pages + 1, -1)
        return np.cumsum(edges[:-1]) > 0

    def nonzero_pages(self) -> np.ndarray:
        self._resolve(np.arange(len(self._block_ids)))
        return np.flatnonzero(self._has_data)

    def _check_out(self, out, npages: int) -> memoryview:
        mv = memoryview(out).cast("B")
        if mv.readonly:
            raise RepositoryError(f"{self._what}: output buffer is read-only")
        if len(mv) < npages * PAGE_SIZE:
            raise RepositoryError(f"{self._what}: output buffer of {len(mv)} bytes is smaller "
                                  f"than {npages} pages")
        return mv

    def read_into(self, out, threads: int = 2) -> None:
        """Fill `out` (size bytes, already zero) with the region; zero pages are skipped.
        The bytes done go to current_progress(), zero pages at once."""
        mv = self._check_out(out, self.npages)
        pages = self.nonzero_pages()
        progress = current_progress()
        progress.advance(self.size - len(pages) * PAGE_SIZE)
        self._read_pages(pages, pages, mv, threads, progress)

    def read_pages_into(self, page_indices, out) -> None:
        """out[i] = page page_indices[i], zero pages included."""
        pages = np.asarray(page_indices, dtype=np.int64)
        if len(pages) and (pages.min() < 0 or pages.max() >= self.npages):
            raise RepositoryError(f"{self._what}: page index outside 0..{self.npages - 1}")
        mv = self._check_out(out, len(pages))
        self._resolve_pages(pages)
        has_data = self._has_data[pages]
        zero = np.flatnonzero(~has_data)
        if len(zero):
            view = np.frombuffer(mv, dtype=np.uint8)[:len(pages) * PAGE_SIZE].reshape(-1, PAGE_SIZE)
            view[zero] = 0
        data = np.flatnonzero(has_data)
        self._read_pages(pages[data], data, mv, threads=self._repo.io_threads)

    def _read_pages(self, pages: np.ndarray, dest: np.ndarray, out: memoryview, threads: int,
                    progress: Progress = _Quiet()) -> None:
        """Copy the (resolved, non-zero) `pages` to page positions `dest` of `out`."""
        if not len(pages):
            return
        locs = self._locs[pages]
        order = np.lexsort((locs[:, 2], locs[:, 1], locs[:, 0]))
        locs, dest, pages = locs[order], dest[order], pages[order]
        ids = self._ids[pages]
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
            copied = 0
            for fno, raw in fetch_frames(self._repo, pack, group, TASK_BYTES, self._what):
                a, b = rows_of[(pack_no, fno)]
                self._check_and_copy(pack, fno, raw, locs[a:b, 2], ids[a:b], dest[a:b], out)
                copied += b - a
            progress.advance(copied * PAGE_SIZE)

        try:
            if threads <= 1 or len(tasks) == 1:
                for task in tasks:
                    run(task)
            else:
                with ThreadPoolExecutor(max_workers=threads) as pool:
                    list(pool.map(run, tasks))
        finally:
            # `run` keeps `out` in its closure, and a failure's traceback keeps `run`:
            # empty the cell so the caller can close the buffer `out` views.
            del out

    def _check_and_copy(self, pack: PackInfo, fno: int, raw: bytes, slots: np.ndarray,
                        ids: np.ndarray, dest: np.ndarray, out) -> None:
        if int(slots.max()) * PAGE_SIZE >= len(raw):
            raise CorruptObject(pack.key, f"frame {fno} has no slot {int(slots.max())}")
        bad = pagehash.check_slots(raw, slots, ids, self._repo.crypto.id_key)
        if bad >= 0:
            raise CorruptObject(pack.key, f"frame {fno} slot {int(slots[bad])} does not hash to "
                                          f"page id {ids[bad].tobytes().hex()} ({self._what})")
        pagehash.copy_pages(out, dest, raw, slots)


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
