"""Guest pages on the wire: one PAGES message carries a batch of pages, each as
data (in one zstd frame), as a copy of a page the receiver already holds, as a
page of the shared base snapshot, or as a zero page.

    PAGES payload  n_data u32 | n_copy u32 | n_zero u32 | n_base u32 | codec u8 | 3 reserved | raw_len u32
                   data pages u32[n_data] | copy dst u32[n_copy] | copy src u32[n_copy]
                   | zero pages u32[n_zero] | base pages u32[n_base] | frame (to the end)

Pages are numbered across all RAM regions in layout order (region 0's pages, then
region 1's), which is also how the receiver lays out its staging memory.

The sender keeps an exact picture of the receiver's staging memory (the page id,
sha256 as in the repository, of every page it holds), so a page the receiver
already has is not sent at all, and content it holds elsewhere is sent as a copy.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import zstandard

from snapvisor.migrate.errors import StreamError
from snapvisor.store.pagehash import ID_SIZE, PAGE_SIZE, hash_pages

BATCH = struct.Struct("<IIIIB3xI")
ZSTD_LEVEL = 1
CODEC_RAW = 0
CODEC_ZSTD = 1
SKIP_AFTER = 4
PROBE_EVERY = 8

_local = threading.local()


def compress_pages(data: np.ndarray) -> tuple[int, bytes | memoryview]:
    """(codec, frame) for contiguous pages: a zstd frame, or the pages themselves
    (no copy) when zstd does not shrink them."""
    compressor = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    raw = memoryview(data).cast("B")
    packed = compressor.compress(raw)
    return (CODEC_ZSTD, packed) if len(packed) < len(raw) else (CODEC_RAW, raw)


def decompress_pages(kind: int, frame: memoryview, raw_len: int) -> bytes | memoryview:
    """The raw pages of a frame; StreamError when it does not decode to raw_len bytes."""
    if kind == CODEC_RAW:
        if len(frame) != raw_len:
            raise StreamError(f"a raw PAGES frame holds {len(frame)} bytes, not {raw_len}; the stream is corrupt")
        return frame
    if kind != CODEC_ZSTD:
        raise StreamError(f"a PAGES frame uses unknown codec {kind}; the stream is corrupt")
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    try:
        raw = decompressor.decompress(frame, max_output_size=raw_len)
    except zstandard.ZstdError as exc:
        raise StreamError(f"a PAGES frame does not decode ({exc}); the stream is corrupt") from None
    if len(raw) != raw_len:
        raise StreamError(f"a PAGES frame decodes to {len(raw)} bytes, not {raw_len}; the stream is corrupt")
    return raw


@dataclass
class Layout:
    """RAM regions (name, size) in order, and where each starts in the global page numbering."""

    regions: list[tuple[str, int]]

    def __post_init__(self) -> None:
        self.first_page = np.cumsum([0] + [size // PAGE_SIZE for _, size in self.regions])

    @property
    def total_pages(self) -> int:
        return int(self.first_page[-1])

    @property
    def size(self) -> int:
        return self.total_pages * PAGE_SIZE

    def split(self, pages: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(region number, region-local page numbers) for sorted global `pages`."""
        bounds = np.searchsorted(pages, self.first_page)
        return [(r, pages[bounds[r]:bounds[r + 1]] - self.first_page[r])
                for r in range(len(self.regions)) if bounds[r + 1] > bounds[r]]

    def locate(self, pages: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray | slice]]:
        """(region number, region-local page numbers, positions in `pages`) for
        global `pages` in any order."""
        owner = np.searchsorted(self.first_page[1:], pages, side="right")
        if len(pages) and (owner == owner[0]).all():  # the usual case: one region
            region = int(owner[0])
            return [(region, pages - self.first_page[region], slice(None))]
        found = []
        for region in np.unique(owner).tolist():
            at = np.flatnonzero(owner == region)
            found.append((region, pages[at] - self.first_page[region], at))
        return found


@dataclass
class PageBatch:
    data_pages: np.ndarray
    frame: bytes | memoryview
    codec: int
    raw_len: int
    copy_dst: np.ndarray
    copy_src: np.ndarray
    zero_pages: np.ndarray
    base_pages: np.ndarray

    def encode(self) -> list[bytes | memoryview]:
        head = BATCH.pack(len(self.data_pages), len(self.copy_dst), len(self.zero_pages),
                          len(self.base_pages), self.codec, self.raw_len)
        arrays = (self.data_pages, self.copy_dst, self.copy_src, self.zero_pages, self.base_pages)
        return [head, *(np.ascontiguousarray(a, dtype="<u4").tobytes() for a in arrays), self.frame]

    @classmethod
    def decode(cls, payload: bytearray | memoryview, total_pages: int, has_base: bool) -> "PageBatch":
        """A batch whose every page number is inside the layout; anything else is refused."""
        if len(payload) < BATCH.size:
            raise StreamError("a PAGES message is shorter than its header; the stream is corrupt")
        n_data, n_copy, n_zero, n_base, kind, raw_len = BATCH.unpack_from(payload)
        count = n_data + 2 * n_copy + n_zero + n_base
        end = BATCH.size + 4 * count
        if end > len(payload) or raw_len != n_data * PAGE_SIZE:
            raise StreamError("a PAGES message's counts do not match its size; the stream is corrupt")
        numbers = np.frombuffer(payload, dtype="<u4", count=count, offset=BATCH.size).astype(np.int64)
        if count and int(numbers.max()) >= total_pages:
            raise StreamError(f"a PAGES message names page {int(numbers.max())}, beyond the guest's "
                              f"{total_pages} pages; the stream is corrupt")
        if n_base and not has_base:
            raise StreamError("a PAGES message refers to a base snapshot that this receiver did not accept")
        cuts = np.cumsum([n_data, n_copy, n_copy, n_zero])
        data, dst, src, zero, base = np.split(numbers, cuts)
        return cls(data, memoryview(payload)[end:], kind, raw_len, dst, src, zero, base)


class ReceiverImage:
    """The sender's record of what the receiver's staging memory holds."""

    def __init__(self, layout: Layout, base_ids: np.ndarray | None, id_key: bytes | None = None) -> None:
        self.ids = np.zeros((layout.total_pages, ID_SIZE), dtype=np.uint8)
        self.base_ids = base_ids
        # Pages are named as the base's repository names them: keyed in an encrypted one.
        self.id_key = id_key
        # page id -> a page that held it when last sent; checked before use, since
        # the page may have been rewritten since.
        self._holders: dict[bytes, int] = {}
        # Batches in a row that zstd could not shrink (random or encrypted data):
        # after a few, only every PROBE_EVERY-th batch tries again.
        self._incompressible = 0

    def _compress(self, data: np.ndarray) -> tuple[int, bytes | memoryview]:
        streak = self._incompressible
        if streak >= SKIP_AFTER and streak % PROBE_EVERY:
            self._incompressible = streak + 1
            return CODEC_RAW, memoryview(data).cast("B")
        kind, frame = compress_pages(data)
        self._incompressible = streak + 1 if kind == CODEC_RAW else 0
        return kind, frame

    def plan_final(self, pages: np.ndarray, chunk: np.ndarray) -> tuple[PageBatch, dict[str, int]]:
        """The last batch, sent while the guest is paused: every page as data,
        without hashing (nothing is planned after it, so there is nothing to track)."""
        kind, frame = self._compress(chunk)
        empty = np.empty(0, dtype=np.int64)
        batch = PageBatch(pages, frame, kind, chunk.nbytes, empty, empty, empty, empty)
        return batch, {"data": len(pages)}

    def plan(self, pages: np.ndarray, chunk: np.ndarray, in_round: np.ndarray) -> tuple[PageBatch, dict[str, int]]:
        """A batch that brings the receiver's `pages` to the content in `chunk`
        (a private copy, one row per page). Pages of the same round may be planned
        in parallel: they are distinct, and copy sources are never pages of this round."""
        ids, nonzero = hash_pages(chunk, self.id_key)
        changed = ~(ids == self.ids[pages]).all(axis=1)
        zero = changed & ~nonzero
        base = np.zeros_like(changed)
        if self.base_ids is not None:
            base = changed & nonzero & (ids == self.base_ids[pages]).all(axis=1)
        rest = np.flatnonzero(changed & nonzero & ~base)
        copy_at = copy_src = np.empty(0, dtype=np.int64)
        if self._holders and len(rest):
            holders = np.array([self._holders.get(key, -1) for key in _keys(ids[rest])], dtype=np.int64)
            found = np.flatnonzero(holders >= 0)
            source = holders[found]
            # Usable only if the receiver still holds that content there and keeps it this round.
            usable = ~in_round[source] & (self.ids[source] == ids[rest[found]]).all(axis=1)
            copy_at, copy_src = found[usable], source[usable]
        data = np.delete(rest, copy_at)
        self.ids[pages[changed]] = ids[changed]
        # Usually every page is data: compress the chunk as it is, without a gathering copy.
        kind, frame = self._compress(chunk if len(data) == len(pages) else chunk[data]) if len(data) \
            else (CODEC_RAW, b"")
        batch = PageBatch(
            data_pages=pages[data], frame=frame, codec=kind, raw_len=len(data) * PAGE_SIZE,
            copy_dst=pages[rest[copy_at]], copy_src=copy_src,
            zero_pages=pages[zero], base_pages=pages[base],
        )
        counts = {"data": len(data), "copied": len(copy_at), "zero": int(zero.sum()), "base": int(base.sum()),
                  "unchanged": int(len(pages) - changed.sum())}
        return batch, counts

    def remember(self, batch: PageBatch) -> None:
        """After a round: the pages sent as data can be copy sources from the next round on."""
        self._holders.update(zip(_keys(self.ids[batch.data_pages]), batch.data_pages.tolist()))


def _keys(ids: np.ndarray) -> list[bytes]:
    """Rows of page ids as bytes (dict keys)."""
    blob = ids.tobytes()
    return [blob[i:i + ID_SIZE] for i in range(0, len(blob), ID_SIZE)]


class Staging(Protocol):
    """The receiver's pages before the VM runs, by global page number."""

    def put(self, pages: np.ndarray, rows: np.ndarray) -> None: ...

    def get(self, pages: np.ndarray) -> np.ndarray: ...


def apply_batch(batch: PageBatch, staging: Staging, fetch_base: Callable[[np.ndarray], None] | None) -> None:
    """Write a batch into the receiver's staging pages. Copies read the staging
    pages as they were before this batch, so they go first."""
    if len(batch.copy_dst):
        staging.put(batch.copy_dst, staging.get(batch.copy_src))
    if len(batch.zero_pages):
        staging.put(batch.zero_pages, np.zeros((len(batch.zero_pages), PAGE_SIZE), dtype=np.uint8))
    if len(batch.base_pages):
        assert fetch_base is not None  # decode() refuses base pages without a base
        fetch_base(batch.base_pages)
    if len(batch.data_pages):
        raw = decompress_pages(batch.codec, batch.frame, batch.raw_len)
        staging.put(batch.data_pages, np.frombuffer(raw, dtype=np.uint8).reshape(-1, PAGE_SIZE))
