"""Lazy restore: guest RAM filled on first touch while the rest streams in.

Guest RAM is registered with a userfaultfd. A handler thread answers faults
(a vCPU touching a page it has not got yet) by filling the whole aligned block
around the page; a prefetch thread walks the remaining blocks in order. When every
block is in, the registration is dropped and the guest runs at full speed.

Invariant: while a lazy fill is in flight, VMM Python code must not read or write
guest RAM that may not be resident: the fault would block a thread that holds the
GIL, and the handler needs the GIL to answer. vCPUs fault inside KVM_RUN, which
releases the GIL, so guest execution is always safe. `wait()` before touching RAM,
or (devices, through GuestMemory's accessors) let `make_resident` fill it first.
"""

from __future__ import annotations

import mmap
import select
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from snapvisor.errors import SnapvisorError
from snapvisor.image.userfault import Userfaultfd, address_of
from snapvisor.store import PAGE_SIZE, RegionReader
from snapvisor.vmm.memory import MemoryRegion

BLOCK_PAGES = 64  # 256 KiB: a fault brings in its neighbours, which guests touch next
# The prefetcher reads this many blocks per repository call (32 MiB): the reader
# decompresses their frames in parallel, and faults are served meanwhile. (8 MiB
# calls filled 1 GiB ~20% slower here: per-call set-up.)
PREFETCH_BLOCKS = 128
_POLL_S = 0.05
FIRST_FAULT_WAIT_S = 0.1


class LazyRestoreError(SnapvisorError):
    """Guest memory could not be fetched from the repository during a lazy restore."""


@dataclass
class _LazyRegion:
    region: MemoryRegion
    reader: RegionReader
    base: int  # host address of the mapping
    resident: np.ndarray  # one bool per block
    has_data: np.ndarray  # one bool per block: False when every page of it is zero


class LazyMemory:
    """Serves page faults of guest RAM from a snapshot and prefetches the rest."""

    def __init__(
        self, regions: list[tuple[MemoryRegion, RegionReader]], on_error: Callable[[BaseException], None]
    ) -> None:
        self._on_error = on_error
        self._uffd = Userfaultfd()
        self._regions: list[_LazyRegion] = []
        for region, reader in regions:
            blocks = -(-region.pages // BLOCK_PAGES)
            has_data = reader.data_blocks(BLOCK_PAGES)
            base = address_of(region.view)
            self._uffd.register_missing(base, region.size)
            self._regions.append(_LazyRegion(region, reader, base, np.zeros(blocks, dtype=bool), has_data))
        self._fill_lock = threading.Lock()
        self._error_lock = threading.Lock()
        # Anonymous mappings, not bytearrays: those are zeroed (every page touched)
        # when made, which costs milliseconds before the guest can start.
        self._scratch = mmap.mmap(-1, BLOCK_PAGES * PAGE_SIZE)
        self._scratch_address = address_of(self._scratch)
        self._prefetch_buffer = mmap.mmap(-1, PREFETCH_BLOCKS * BLOCK_PAGES * PAGE_SIZE)
        self._prefetch_address = address_of(self._prefetch_buffer)
        self._done = threading.Event()
        self._first_fault = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.faults_served = 0
        self.first_fault_served_at: float | None = None  # perf_counter(): the guest's first instruction ran
        self.started = time.perf_counter()
        self.completed_s: float | None = None
        self._handler = threading.Thread(target=self._serve_faults, name="lazy-faults", daemon=True)
        self._prefetcher = threading.Thread(target=self._prefetch, name="lazy-prefetch", daemon=True)

    def start(self) -> None:
        self._handler.start()
        self._prefetcher.start()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once all of guest RAM is resident (or the fill failed: see `error`)."""
        return self._done.wait(timeout)

    def wait_complete(self) -> None:
        """Return once all of guest RAM is resident; raise LazyRestoreError if the fill
        failed (guest RAM then has holes that read as zeros: nothing may copy it)."""
        self._done.wait()
        self._check_complete()

    def _check_complete(self) -> None:
        if self.error is not None:
            raise LazyRestoreError(f"guest memory of this lazy restore is incomplete: {self.error}")

    def make_resident(self, region: MemoryRegion, offset: int, length: int) -> None:
        """Fill the blocks of [offset, offset+length) of `region` now, in the calling
        thread: for VMM code (a device) that must touch guest RAM during the fill
        (GuestMemory.before_access), which would otherwise fault holding the GIL."""
        self._check_complete()
        if self._done.is_set() or length <= 0:
            return
        lazy = next(lazy for lazy in self._regions if lazy.region is region)
        first, last = offset // PAGE_SIZE // BLOCK_PAGES, (offset + length - 1) // PAGE_SIZE // BLOCK_PAGES
        for block in range(first, last + 1):
            self._fill_block(lazy, block)

    def close(self) -> None:
        """After the VM is closed (no vCPU may be left waiting on a fault)."""
        self._stop.set()
        for thread in (self._handler, self._prefetcher):
            if thread.is_alive():
                thread.join()
        self._uffd.close()
        # Nothing holds a view of the buffers now: the reads into them are over and
        # a failure keeps no traceback (see _fail).
        self._scratch.close()
        self._prefetch_buffer.close()

    # --- filling --------------------------------------------------------------
    def _fill_block(self, lazy: _LazyRegion, block: int) -> None:
        with self._fill_lock:
            if lazy.resident[block]:
                return
            first = block * BLOCK_PAGES
            count = min(BLOCK_PAGES, lazy.region.pages - first)
            length = count * PAGE_SIZE
            destination = lazy.base + first * PAGE_SIZE
            if lazy.has_data[block]:
                lazy.reader.read_pages_into(np.arange(first, first + count), self._scratch)
                _fill_all(lambda dst, src, n: self._uffd.copy(dst, src, n), destination, self._scratch_address, length)
            else:
                _fill_all(lambda dst, _src, n: self._uffd.zeropage(dst, n), destination, 0, length)
            lazy.resident[block] = True

    def _serve_faults(self) -> None:
        try:
            while not self._stop.is_set() and not self._done.is_set():
                ready, _, _ = select.select([self._uffd.fd], [], [], _POLL_S)
                if not ready:
                    continue
                while (fault := self._uffd.read_fault()) is not None:
                    lazy, block = self._locate(fault.address)
                    self._fill_block(lazy, block)
                    self._uffd.wake(fault.address & ~(PAGE_SIZE - 1), PAGE_SIZE)
                    self.faults_served += 1
                    if self.first_fault_served_at is None:
                        self.first_fault_served_at = time.perf_counter()
                        self._first_fault.set()
        except BaseException as exc:  # the guest would hang on its next fault: stop it, say why
            self._fail(exc)

    def _prefetch(self) -> None:
        # The guest's first instruction first: the prefetcher's first batch would
        # compete with that fault for the page map and the GIL.
        self._first_fault.wait(FIRST_FAULT_WAIT_S)
        try:
            for lazy in self._regions:
                # All-zero blocks stay holes: once the range is unregistered, a touch
                # of one is an ordinary fault that maps a fresh zero page.
                data_blocks = np.flatnonzero(lazy.has_data)
                for start in range(0, len(data_blocks), PREFETCH_BLOCKS):
                    if self._stop.is_set() or self.error is not None:  # closing, or a fault's fill failed
                        return
                    self._prefetch_blocks(lazy, data_blocks[start : start + PREFETCH_BLOCKS])
            for lazy in self._regions:
                self._uffd.unregister(lazy.base, lazy.region.size)
            self.completed_s = time.perf_counter() - self.started
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._done.set()

    def _prefetch_blocks(self, lazy: _LazyRegion, blocks: np.ndarray) -> None:
        blocks = blocks[~lazy.resident[blocks]]
        if not len(blocks):
            return
        counts = np.minimum(BLOCK_PAGES, lazy.region.pages - blocks * BLOCK_PAGES)
        pages = np.concatenate([np.arange(b * BLOCK_PAGES, b * BLOCK_PAGES + c) for b, c in zip(blocks, counts)])
        # Read outside the lock, so that faults are answered meanwhile.
        lazy.reader.read_pages_into(pages, self._prefetch_buffer)
        offsets = np.concatenate(([0], np.cumsum(counts)[:-1])) * PAGE_SIZE
        for block, count, offset in zip(blocks.tolist(), counts.tolist(), offsets.tolist()):
            # The lock per block: a fault waits for one 256 KiB copy at most.
            with self._fill_lock:
                if lazy.resident[block]:
                    continue  # a fault brought it in first
                destination = lazy.base + block * BLOCK_PAGES * PAGE_SIZE
                _fill_all(lambda dst, src, n: self._uffd.copy(dst, src, n), destination,
                          self._prefetch_address + offset, count * PAGE_SIZE)
                lazy.resident[block] = True

    def _fail(self, exc: BaseException) -> None:
        """Stop the guest (on_error), then let go of the vCPUs waiting on faults.

        The error is kept as a new exception with the message only: the original's
        traceback holds the frames that were reading into the scratch and prefetch
        buffers, with their views of those mappings, and close() could not unmap
        them while it lived (BufferError). A SnapvisorError's message is for the
        operator as it is; anything else is a bug, named as such.
        """
        with self._error_lock:
            first = self.error is None
            if first:
                self.error = LazyRestoreError(str(exc) if isinstance(exc, SnapvisorError) else f"internal error: {exc!r}")
        if first:
            self._on_error(self.error)
            self._release_waiting_vcpus()
        self._done.set()

    def _release_waiting_vcpus(self) -> None:
        """A vCPU that faulted on a page nobody will fill now waits in the kernel,
        where no signal reaches it (it spins there on this host): the VM could
        never stop, nor the process exit. Unregistering guest RAM wakes it; the
        fault then maps a zero page, but the guest runs no further on it: the
        stop that on_error requested left a kick pending, and KVM returns to us
        before it would enter the guest again. Python code cannot read the holes
        either: make_resident and wait_complete raise from now on."""
        for lazy in self._regions:
            try:
                self._uffd.unregister(lazy.base, lazy.region.size)
            except SnapvisorError:
                pass  # already unregistered: the fill had finished this far

    def _locate(self, address: int) -> tuple[_LazyRegion, int]:
        for lazy in self._regions:
            if lazy.base <= address < lazy.base + lazy.region.size:
                return lazy, (address - lazy.base) // PAGE_SIZE // BLOCK_PAGES
        raise LazyRestoreError(f"page fault at host address {address:#x} is outside guest RAM")


def _fill_all(fill, destination: int, source: int, length: int) -> None:
    """Fill [destination, +length); pages another thread already filled are skipped
    (the kernel stops a copy at the first present page and reports how far it got)."""
    done = 0
    while done < length:
        filled = fill(destination + done, source + done if source else 0, length - done)
        done += filled if filled > 0 else PAGE_SIZE
