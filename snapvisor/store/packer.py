"""Collects frames into packs of several MiB and uploads them in the background.

Pack layout: frame payloads back to back, then the zstd-compressed frame table and
a fixed footer (see docs/format.md). Each pack gets a random 128-bit id, so two
writers can never collide on a name.
"""

from __future__ import annotations

import secrets
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from snapvisor.store import format as fmt
from snapvisor.store.backend import ObjectStore


class Packer:
    def __init__(self, store: ObjectStore, pack_size: int, upload_threads: int = 4):
        self.store = store
        self.pack_size = pack_size
        self._uploads = ThreadPoolExecutor(max_workers=upload_threads,
                                           thread_name_prefix="snapvisor-upload")
        self._pending: list[Future] = []
        self._payloads: list[bytes] = []
        self._frames: list[tuple] = []
        self._offset = 0
        self._entries: list[tuple[bytes, int, int]] = []  # (id, frame, slot) in the open pack
        # Sealed packs: (pack_id, size, frames) and entries (id, pack number, frame, slot).
        self.packs: list[tuple[bytes, int, np.ndarray]] = []
        self.entries: list[tuple[bytes, int, int, int]] = []
        self.bytes_written = 0
        self.objects_written = 0

    def add_frame(self, kind: int, codec: int, payload: bytes, raw_len: int, ids: list[bytes]) -> None:
        """Append one frame holding the objects `ids` (one slot each, in order)."""
        frame_no = len(self._frames)
        self._frames.append((self._offset, len(payload), raw_len, len(ids), codec, kind, 0))
        self._payloads.append(payload)
        self._offset += len(payload)
        self._entries.extend((object_id, frame_no, slot) for slot, object_id in enumerate(ids))
        if self._offset >= self.pack_size:
            self.seal()

    def seal(self) -> None:
        """Close the open pack and start its upload."""
        if not self._frames:
            return
        frames = np.array(self._frames, dtype=fmt.FRAME_DTYPE)
        self._payloads.append(fmt.encode_pack_trailer(frames))
        body = b"".join(self._payloads)
        pack_id = secrets.token_bytes(16)
        number = len(self.packs)
        self.packs.append((pack_id, len(body), frames))
        self.entries.extend((oid, number, fr, slot) for oid, fr, slot in self._entries)
        self._pending.append(self._uploads.submit(self.store.put, fmt.pack_key(pack_id), body))
        self.bytes_written += len(body)
        self.objects_written += 1
        self._payloads, self._frames, self._entries, self._offset = [], [], [], 0
        # Bound the memory held by uploads in flight.
        while len(self._pending) > 8:
            self._pending.pop(0).result()

    def finish(self) -> None:
        """Seal the open pack and wait until every pack is durable."""
        self.seal()
        pending, self._pending = self._pending, []
        for fut in pending:
            fut.result()

    def index_file(self) -> fmt.IndexFile:
        packs = np.array([(pid, size, len(frames)) for pid, size, frames in self.packs],
                         dtype=fmt.PACK_RECORD_DTYPE)
        entries = np.array(self.entries, dtype=fmt.ENTRY_DTYPE)
        return fmt.IndexFile(packs, [frames for _, _, frames in self.packs], entries)

    def close(self) -> None:
        self._uploads.shutdown(wait=True, cancel_futures=True)
