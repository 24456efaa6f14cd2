"""Lazy disks: a lazily restored VM's disk images fill in from the snapshot on
demand and in the background, so the guest starts before its disks are read.

Each image starts as a sparse file of the disk's size, attached at once. Its
BlockFile gets a filler (`BlockFile.filler`, the device layer's only hook: it
never sees the repository) that, under one lock per disk,
- before a guest read, brings in the blocks the read lacks, with the rest of
  their aligned group of 64 (256 KiB: guests read on, as lazy memory assumes);
- before a guest write, brings in a block the write covers only in part
  (read-modify-write), and hands every block it covers to the guest.
A block once in (filled, or handed to the guest) is never written by the fill
again, so nothing the guest wrote is overwritten and nothing old comes back.
A background thread fills the remaining groups that hold data in 32 MiB reads,
outside the lock; it starts once guest RAM is in (a memory fault stalls a vCPU
whatever it does, a disk miss only the request that needs the blocks).
Groups without data are in from the start: the sparse file reads them as
zeros, and all-zero blocks of other groups are never written either, so the
image ends as sparse as an eagerly restored one.

A failed fetch fails the request (the guest sees an I/O error, never wrong
data) and reports to `on_error`, which stops the VM; later requests for blocks
not in fail the same way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Mapping

import numpy as np

from snapvisor.image.lazy import BLOCK_PAGES, PREFETCH_BLOCKS
from snapvisor.store import RegionReader
from snapvisor.vmm.devices.blockfile import BLOCK_SIZE, BlockFile, FillError

GROUP_BLOCKS = BLOCK_PAGES  # a miss brings in 256 KiB
FILL_GROUPS = PREFETCH_BLOCKS  # the background fill reads 32 MiB per repository call
_POLL_S = 0.05
log = logging.getLogger("snapvisor.image")


class _LazyImage:
    """One disk being filled: the `Filler` its BlockFile calls."""

    def __init__(self, owner: "LazyDisks", name: str, disk: BlockFile, reader: RegionReader) -> None:
        self.name = name
        self.disk = disk
        self.reader = reader
        self._owner = owner
        self.has_data = reader.data_blocks(GROUP_BLOCKS)  # one bool per group
        self.filled = np.repeat(~self.has_data, GROUP_BLOCKS)[: disk.blocks]  # one bool per block
        self.lock = threading.Lock()
        self.complete = threading.Event()  # every block in, or the fill ended without it (see ok)
        self.ok = False
        self.on_demand = 0  # blocks brought in for guest requests
        self.in_background = 0  # blocks brought in by the background fill
        # Our own descriptor: the guest's may be read-only, and this one needs no lock.
        self._fd = os.open(f"/proc/self/fd/{disk.fd}", os.O_WRONLY | os.O_CLOEXEC)
        self._scratch = _buffer(GROUP_BLOCKS)

    # --- the Filler hook (guest request threads) -------------------------------------------
    def before_read(self, offset: int, length: int) -> None:
        first, last = offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE
        with self.lock:
            for group in range(first // GROUP_BLOCKS, last // GROUP_BLOCKS + 1):
                self._fetch_group(group)

    def before_write(self, offset: int, length: int) -> None:
        first, last = offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE
        with self.lock:
            for block, cut in ((first, offset % BLOCK_SIZE), (last, (offset + length) % BLOCK_SIZE)):
                if cut and not self.filled[block]:
                    self._fetch_group(block // GROUP_BLOCKS)
            self.filled[first : last + 1] = True

    def wait(self) -> None:
        self.complete.wait()
        if not self.ok:
            why = self._owner.error or "the VM was closed first"
            raise FillError(f"disk {self.name} of a lazy restore is not complete and will not be: {why}")

    def _fetch_group(self, group: int) -> None:
        """Bring in the blocks of `group` not in yet (lock held)."""
        start = group * GROUP_BLOCKS
        blocks = start + np.flatnonzero(~self.filled[start : start + GROUP_BLOCKS])
        if not len(blocks):
            return
        if self._owner.error is not None:
            raise FillError(f"disk {self.name}: blocks {blocks[0]}..{blocks[-1]} are not in; "
                            f"the lazy restore failed earlier: {self._owner.error}")
        try:
            self.reader.read_pages_into(blocks, self._scratch)
            self._write(blocks, self._scratch[: len(blocks)])
        except Exception as exc:
            raise self._owner.fail(f"disk {self.name}, blocks {blocks[0]}..{blocks[-1]}", exc) from exc
        self.filled[blocks] = True
        self.on_demand += len(blocks)

    # --- the background fill (the owner's thread) --------------------------------------------
    def fill(self, groups: np.ndarray, buffer: np.ndarray) -> None:
        with self.lock:
            blocks = (groups[:, None] * GROUP_BLOCKS + np.arange(GROUP_BLOCKS)).ravel()
            blocks = blocks[blocks < self.disk.blocks]
            blocks = blocks[~self.filled[blocks]]
        if not len(blocks):
            return
        try:
            self.reader.read_pages_into(blocks, buffer)  # outside the lock: guest I/O goes on
            with self.lock:
                fresh = ~self.filled[blocks]  # not read or written by the guest meanwhile
                self._write(blocks[fresh], buffer[: len(blocks)][fresh])
                self.filled[blocks[fresh]] = True
                self.in_background += int(fresh.sum())
        except Exception as exc:
            raise self._owner.fail(f"disk {self.name}, blocks {blocks[0]}..{blocks[-1]}", exc) from exc

    def finish(self) -> None:
        """Every block is in: make the image as durable as an eager restore's, and
        take the filler off the disk's I/O path."""
        os.fdatasync(self._fd)
        self.disk.filler = None
        self.ok = True
        self.complete.set()

    def _write(self, blocks: np.ndarray, data: np.ndarray) -> None:
        """Write `data` (one row per block) into the image, one call per run of
        consecutive non-zero blocks; all-zero blocks stay holes."""
        rows = np.flatnonzero(data.view(np.uint64).any(axis=1))
        for run in np.split(rows, np.flatnonzero(np.diff(blocks[rows]) != 1) + 1):
            if len(run):
                view = memoryview(data[run[0] : run[-1] + 1]).cast("B")
                offset = int(blocks[run[0]]) * BLOCK_SIZE
                while view:
                    written = os.pwrite(self._fd, view, offset)
                    view, offset = view[written:], offset + written

    def close(self) -> None:
        os.close(self._fd)


def _buffer(blocks: int) -> np.ndarray:
    # np.empty does not touch its memory: nothing proportional to the buffer
    # happens before the guest starts.
    return np.empty((blocks, BLOCK_SIZE), dtype=np.uint8)


class LazyDisks:
    """The disks of a lazily restored VM, filling in from their snapshot regions.

    Public: `wait()`, `done`, `error`, `completed_s` (seconds from the restore to
    the last block) and the block counts `blocks_on_demand` (brought in for guest
    requests) and `blocks_in_background` (by the fill thread)."""

    def __init__(
        self, disks: Mapping[str, tuple[BlockFile, RegionReader]], on_error: Callable[[BaseException], None]
    ) -> None:
        self._on_error = on_error
        self._images: list[_LazyImage] = []
        for name, (disk, reader) in disks.items():
            try:
                self._images.append(_LazyImage(self, name, disk, reader))
            except BaseException:
                for image in self._images:
                    image.close()
                raise
        self._buffer = _buffer(FILL_GROUPS * GROUP_BLOCKS)
        self._error_lock = threading.Lock()
        self._done = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.started = time.perf_counter()
        self.completed_s: float | None = None
        self._after: Callable[[float], bool] | None = None
        self._thread = threading.Thread(target=self._fill, name="lazy-disks", daemon=True)
        for image in self._images:
            image.disk.filler = image

    def start(self, after: Callable[[float], bool] | None = None) -> None:
        """Start the background fill, once `after(timeout)` (LazyMemory.wait, say) is true."""
        self._after = after
        self._thread.start()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once every disk is complete (or the fill failed: see `error`)."""
        return self._done.wait(timeout)

    @property
    def blocks_on_demand(self) -> int:
        return sum(image.on_demand for image in self._images)

    @property
    def blocks_in_background(self) -> int:
        return sum(image.in_background for image in self._images)

    def fail(self, what: str, exc: BaseException) -> FillError:
        """Record that `what` could not be brought in (the first failure goes to
        on_error, which stops the VM); the error for the request that needed it."""
        error = FillError(f"{what}: {exc}")
        with self._error_lock:
            first = self.error is None
            if first:
                self.error = error
        if first:
            self._stop.set()
            self._on_error(error)
        return error

    def close(self) -> None:
        """Let the background fill finish first (a VM may stop before its disks are
        in): an image with holes where the snapshot has data would be a wrong disk
        for whoever attaches it next. After a failure, or when the wait is
        interrupted (Ctrl-C), the images stay incomplete and a warning names them."""
        try:
            if self._thread.is_alive():
                self._done.wait()
        finally:
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join()
            incomplete = [str(image.disk.path) for image in self._images if not image.ok]
            if incomplete and self._thread.ident is not None:
                log.warning("disk image %s of a lazy restore is incomplete (%s); do not attach it: "
                            "restore the snapshot again", ", ".join(incomplete), self.error or "interrupted")
            for image in self._images:
                image.complete.set()  # a waiter learns (FillError) that the disk will not complete
                image.close()

    def _fill(self) -> None:
        image: _LazyImage | None = None
        try:
            while self._after is not None and not self._after(_POLL_S):
                if self._stop.is_set():
                    return
            for image in self._images:
                groups = np.flatnonzero(image.has_data)
                for start in range(0, len(groups), FILL_GROUPS):
                    if self._stop.is_set():
                        return
                    image.fill(groups[start : start + FILL_GROUPS], self._buffer)
                image.finish()
            self.completed_s = time.perf_counter() - self.started
        except Exception as exc:  # a failed fetch is reported already; anything else is reported here
            self.fail(f"disk {image.name}" if image else "lazy disks", exc)
        finally:
            if self.error is not None:
                for each in self._images:
                    each.complete.set()
            self._done.set()
