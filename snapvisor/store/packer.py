"""Collects frames into packs of several MiB and uploads them in the background.

Pack layout: frame payloads back to back, then the zstd-compressed frame table and
a fixed footer (see docs/format.md). Each pack gets a random 128-bit id, so two
writers can never collide on a name. In an encrypted repository each frame and the
frame table are sealed on their own (ranged reads fetch single frames), bound to
the pack's name and the frame's number. A sealed frame is SEAL_OVERHEAD bytes longer
than its payload, so its place is known at once: payloads are laid out with room
for nonce and tag, and the upload thread seals them where they lie, off the
writer's thread.
"""

from __future__ import annotations

import queue
import secrets
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from snapvisor.store import format as fmt
from snapvisor.store.backend import ObjectStore
from snapvisor.store.crypto import NONCE_SIZE, SEAL_OVERHEAD, NoEncryption
from snapvisor.store.gate import Gate
from snapvisor.store.pagehash import ID_SIZE

MAX_UPLOADS_IN_FLIGHT = 8


class Packer:
    def __init__(self, store: ObjectStore, pack_size: int, upload_threads: int = 4, gate: Gate | None = None,
                 crypto: NoEncryption = NoEncryption()):
        self.store = store
        self._gate = gate or Gate()  # uploads start only while it is open
        self.crypto = crypto
        self.pack_size = pack_size
        self._uploads = ThreadPoolExecutor(max_workers=upload_threads,
                                           thread_name_prefix="snapvisor-upload")
        self._pending: list[Future] = []
        # Pack buffers are reused: fresh multi-MiB allocations cost a page fault per
        # 4 KiB, which on a VM is a large share of a snapshot's CPU time.
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._buffers = 0
        self._buf: bytearray | None = None
        self._pack_id = b""  # of the open pack: chosen when it opens, sealed frames name it
        self._frames: list[tuple] = []
        self._offset = 0
        self._ids: list[bytes] = []  # per frame of the open pack: its objects' ids, concatenated
        # Sealed packs: (pack_id, size, frames, ids per frame).
        self.packs: list[tuple[bytes, int, np.ndarray, list[bytes]]] = []
        self.bytes_written = 0
        self.objects_written = 0

    def add_frame(self, kind: int, codec: int, payload: bytes, raw_len: int, ids: bytes) -> None:
        """Append one frame holding the objects whose ids are concatenated in `ids`."""
        if self._buf is None:
            self._buf = self._take_buffer()
            self._pack_id = secrets.token_bytes(16)
        sealed = self.crypto.encrypted
        self._frames.append((self._offset, len(payload) + (SEAL_OVERHEAD if sealed else 0), raw_len,
                             len(ids) // ID_SIZE, codec, kind, 0))
        if sealed:
            self._offset += NONCE_SIZE  # room for the nonce; the tag goes after the payload
        self._append(payload)
        if sealed:
            self._offset += SEAL_OVERHEAD - NONCE_SIZE
        self._ids.append(ids)
        if self._offset >= self.pack_size:
            self.seal()

    def _take_buffer(self) -> bytearray:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            self._buffers += 1
            return bytearray(self.pack_size + (1 << 20))

    def _append(self, data) -> None:
        end = self._offset + len(data)
        if end > len(self._buf):  # a frame larger than the slack: grow this buffer
            self._buf.extend(bytes(end - len(self._buf)))
        self._buf[self._offset:end] = data
        self._offset = end

    def seal(self) -> None:
        """Close the open pack and start its upload."""
        if not self._frames:
            return
        frames = np.array(self._frames, dtype=fmt.FRAME_DTYPE)
        pack_id = self._pack_id
        self._append(fmt.encode_pack_trailer(frames, self.crypto, fmt.pack_key(pack_id)))
        buf, size = self._buf, self._offset
        self.packs.append((pack_id, size, frames, self._ids))
        upload = self._uploads.submit(self._gate.run, self._upload, pack_id, buf, size, frames)
        upload.add_done_callback(lambda _: self._free.put(buf))
        self._pending.append(upload)
        self.bytes_written += size
        self.objects_written += 1
        self._buf, self._frames, self._ids, self._offset = None, [], [], 0
        # Bound the memory held by uploads in flight.
        while len(self._pending) > MAX_UPLOADS_IN_FLIGHT:
            self._pending.pop(0).result()

    def _upload(self, pack_id: bytes, buf: bytearray, size: int, frames: np.ndarray) -> None:
        key = fmt.pack_key(pack_id)
        if self.crypto.encrypted:
            for number, (offset, sealed_len) in enumerate(zip(frames["offset"].tolist(), frames["clen"].tolist())):
                self.crypto.seal_in_place(buf, offset, sealed_len, fmt.frame_context(key, number))
        self.store.put(key, memoryview(buf)[:size])

    def finish(self) -> None:
        """Seal the open pack and wait until every pack is durable."""
        self.seal()
        pending, self._pending = self._pending, []
        for fut in pending:
            fut.result()

    def index_file(self) -> fmt.IndexFile:
        packs = np.array([(pid, size, len(frames)) for pid, size, frames, _ in self.packs],
                         dtype=fmt.PACK_RECORD_DTYPE)
        blobs = [ids for *_, per_frame in self.packs for ids in per_frame]
        counts = np.array([len(b) // ID_SIZE for b in blobs], dtype=np.int64)
        pack_of_frame = np.repeat(np.arange(len(self.packs)),
                                  [len(frames) for _, _, frames, _ in self.packs])
        frame_no = np.concatenate([np.arange(len(frames)) for _, _, frames, _ in self.packs]) \
            if self.packs else np.zeros(0, np.int64)
        total = int(counts.sum())
        entries = np.empty(total, dtype=fmt.ENTRY_DTYPE)
        entries["id"] = np.frombuffer(b"".join(blobs), dtype="V32")
        entries["pack"] = np.repeat(pack_of_frame, counts)
        entries["frame"] = np.repeat(frame_no, counts)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        entries["slot"] = np.arange(total) - starts
        return fmt.IndexFile(packs, [frames for _, _, frames, _ in self.packs], entries)

    def close(self) -> None:
        self._uploads.shutdown(wait=True, cancel_futures=True)
