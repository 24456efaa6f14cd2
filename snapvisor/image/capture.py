"""Capture: a running VM's memory and state into one repository snapshot.

The VM is paused only for what must be consistent: fetching the dirty log, copying
the pages that changed, and saving vCPU/irqchip/device state. Hashing, compression
and upload run after it resumes, from the private copy.

When a snapshot has to carry many pages (the first one, or after a long gap), they
are first written while the guest runs (pre-copy); the pause then copies only what
the guest dirtied meanwhile, and those pages replace their pre-copied versions.

Every repository gets its own "pending" bitmap: pages dirtied since the last
snapshot committed there. It is cleared only when a commit succeeds, so a failed
upload loses nothing: the next snapshot still contains those pages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from snapvisor.errors import SnapvisorError
from snapvisor.image.compat import compat_record
from snapvisor.image.disks import attached_disks, region_name
from snapvisor.image.gather import gather_pages
from snapvisor.image.state_codec import encode_state
from snapvisor.store import PAGE_SIZE, Repository, SnapshotInfo
from snapvisor.vmm.vm import Vm

STATE_BLOB = "vm-state"
# A pre-copy round runs before the pause when copying the pending pages in the
# pause would take longer than this; at most PRECOPY_ROUNDS rounds, each sending
# what the guest dirtied during the previous one.
PAUSE_COPY_BUDGET_S = 0.005
PRECOPY_ROUNDS = 3
# The copy cost per page, until a pause has measured it on this host: memory
# bandwidth (~4 GB/s). Scattered pages cost far more on some hosts (PVM's shadow
# paging: 2-20 us each), which only a measurement shows.
DEFAULT_COPY_S_PER_PAGE = 1e-6
# Pauses that copied fewer pages than this say little about the cost per page.
MIN_PAGES_TO_MEASURE = 256
# The pause's copy buffer is grown (before the pause) to what is left to copy times
# COPY_BUFFER_GROWTH plus COPY_MARGIN_PAGES, at most COPY_BUFFER_TRIES times per
# snapshot: each growth is followed by a drain, which may find more.
COPY_BUFFER_GROWTH = 1.25
COPY_MARGIN_PAGES = 1024
COPY_BUFFER_TRIES = 3
# Pre-copy reads live memory in batches of this size into a private buffer, so
# the store hashes and compresses the same bytes even if the guest writes on.
PRECOPY_BATCH = 32 << 20


class SnapshotError(SnapvisorError):
    """A snapshot could not be taken; the VM keeps running and nothing is lost."""


@dataclass
class CaptureStats:
    """What one snapshot cost; `pause_s` is the time the guest did not run."""

    snapshot_id: str = ""
    full: bool = False
    pause_s: float = 0.0
    # The pause's parts, in order: stopping the vCPUs (kick to all parked, and how
    # many kick rounds that took), draining the dirty logs, copying the dirty pages,
    # saving vCPU/device state, resuming. `waiting_s`: time in drain, copy and state
    # save when the snapshot thread was not on a CPU (waiting for the GIL, or the
    # host ran something else), so a long pause shows whether it worked or waited.
    stop_s: float = 0.0
    stop_kick_rounds: int = 0
    drain_s: float = 0.0
    copy_s: float = 0.0
    state_s: float = 0.0
    resume_s: float = 0.0
    waiting_s: float = 0.0
    # Pages the pause copied into fresh memory because the copy buffer was too small.
    unbuffered_pages: int = 0
    total_s: float = 0.0
    precopy_pages: int = 0
    paused_pages: int = 0
    # Pages put per region (disk-vda: 4 KiB blocks); one pre-copied and copied again in the pause counts twice.
    region_pages: dict[str, int] = field(default_factory=dict)
    store: dict = field(default_factory=dict)


@dataclass
class _Source:
    """Something a snapshot stores page by page: a guest RAM region, or a disk
    (its 4 KiB blocks, region disk-<name>). Every copy reads `view`, the live
    bytes; `fetch_dirty` returns the pages changed since its previous call;
    `everything` the pages a full snapshot must look at (the rest are zero)."""

    name: str
    size: int
    view: memoryview
    fetch_dirty: Callable[[], np.ndarray]
    everything: Callable[[], np.ndarray]

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE


@dataclass
class _Lineage:
    """Per repository: the last snapshot committed there and the pages dirtied since."""

    parent: str | None
    pending: dict[str, np.ndarray] | None  # None: no usable parent, every page is needed


def repository_key(repo: Repository) -> str:
    return repo.config["id"]


class Snapshotter:
    """Tracks one VM's dirty pages and writes its snapshots."""

    def __init__(self, vm: Vm, name: str) -> None:
        self.vm = vm
        self.name = name
        self._lineages: dict[str, _Lineage] = {}
        self.last: CaptureStats | None = None
        self._copy_s_per_page = DEFAULT_COPY_S_PER_PAGE
        # The pause copies into this buffer, kept from one snapshot to the next (the
        # writer is done with the copies when the snapshot commits).
        self._copy_buffer = np.empty((0, PAGE_SIZE), dtype=np.uint8)
        vm.memory.enable_dirty_log()
        memory = vm.memory
        self._sources = [
            _Source(r.name, r.size, r.view, lambda r=r: memory.fetch_dirty(r), r.populated_pages)
            for r in memory.regions
        ]
        # Disks: their dirty-block record runs from the moment they were attached.
        self._sources += [
            _Source(region_name(name), disk.size, disk.snapshot_view(), disk.fetch_dirty, disk.data_blocks)
            for name, disk in attached_disks(vm).items()
        ]

    def adopt_parent(self, repo: Repository, snapshot_id: str) -> None:
        """The VM's memory and disks equal `snapshot_id` in `repo` now (it was
        restored from it), so the next snapshot there may be incremental against it."""
        self._lineages[repository_key(repo)] = _Lineage(
            snapshot_id, {s.name: np.zeros(s.pages, dtype=bool) for s in self._sources}
        )

    def _drain_dirty(self) -> dict[str, np.ndarray]:
        """Fetch the dirty logs (memory and disks) and fold them into every lineage's pending set."""
        fresh = {source.name: source.fetch_dirty() for source in self._sources}
        for lineage in self._lineages.values():
            if lineage.pending is not None:
                for name, dirty in fresh.items():
                    lineage.pending[name] |= dirty
        return fresh

    def drain_dirty(self) -> dict[str, np.ndarray]:
        """The pages written since the last drain, by source, for other operations
        on the running VM (live migration); every lineage keeps them pending too."""
        return self._drain_dirty()

    def page_sources(self) -> list[tuple[str, int, memoryview]]:
        """(name, size, live bytes) of what is stored page by page: RAM regions, then
        disks. For callers that read them whole (live migration): disks a lazy
        restore is still filling are waited for (FillError if that failed)."""
        for disk in attached_disks(self.vm).values():
            disk.wait_filled()
        return [(source.name, source.size, source.view) for source in self._sources]

    def snapshot(self, repo: Repository, tags: tuple[str, ...] | list[str] = (), full: bool = False) -> SnapshotInfo:
        if not self.vm.running:
            raise SnapshotError(f"VM {self.name} is not running; only a running VM can be snapshotted")
        key = repository_key(repo)
        lineage = self._lineages.setdefault(key, _Lineage(None, None))
        if full or (lineage.parent is not None and lineage.parent not in repo.snapshot_ids()):
            lineage.pending = None  # the parent was pruned, or a full one was asked for
        stats = CaptureStats(full=lineage.pending is None)
        started = time.perf_counter()
        self._drain_dirty()
        regions = self._sources
        needed = lineage.pending or {r.name: r.everything() for r in regions}
        writer = repo.start_snapshot(parent=lineage.parent)
        with writer:
            to_copy = needed
            for _ in range(PRECOPY_ROUNDS):
                if _count(to_copy) * self._copy_s_per_page <= PAUSE_COPY_BUDGET_S:
                    break
                stats.precopy_pages += self._precopy(writer, regions, to_copy, stats.region_pages)
                to_copy = self._drain_dirty()  # what the guest wrote meanwhile
            # The store's work waits while the VM is paused (it would compete for the
            # GIL and the CPUs with the vCPU threads parking and with the copy).
            with writer.held_back():
                to_copy = self._reserve_copy_buffer(to_copy)
                copies, state = self._paused_copy(regions, to_copy, stats)
            for region in regions:
                pages, data = copies[region.name]
                stats.paused_pages += len(pages)
                stats.region_pages[region.name] = stats.region_pages.get(region.name, 0) + len(pages)
                writer.put_region(region.name, region.size, data, pages=pages)
            if stats.paused_pages >= MIN_PAGES_TO_MEASURE:
                self._copy_s_per_page = stats.copy_s / stats.paused_pages
            writer.put_blob(STATE_BLOB, encode_state(state))
            meta = {"compat": compat_record(state["vcpus"][0]["cpuid"]), "kind": "full" if stats.full else "incremental"}
            info = writer.commit(vm=self.name, tags=list(tags), meta=meta)
            stats.store = dict(writer.stats)
        # Committed: every page dirtied up to the pause is in it; pages dirtied since
        # are still in KVM's log and reach `pending` with the next drain.
        lineage.parent = info.id
        lineage.pending = {r.name: np.zeros(r.pages, dtype=bool) for r in regions}
        stats.snapshot_id = info.id
        stats.total_s = time.perf_counter() - started
        self.last = stats
        return info

    def _reserve_copy_buffer(self, to_copy: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Drain once more, right before the pause, and grow the copy buffer (guest
        running) until it holds what is left to copy plus a margin for what the guest
        dirties before the pause; returns what is left. Faulting in a fresh buffer
        takes ~10 us per page here and the guest dirties on meanwhile, so a growth is
        followed by another drain: the last drain is always just before the pause."""
        for _ in range(COPY_BUFFER_TRIES):
            to_copy = _union(to_copy, self._drain_dirty())
            left = _count(to_copy)
            if left + COPY_MARGIN_PAGES <= len(self._copy_buffer):
                break
            self._copy_buffer = _prefaulted_pages(int(left * COPY_BUFFER_GROWTH) + COPY_MARGIN_PAGES)
        return to_copy

    def _paused_copy(
        self, regions: list[_Source], to_copy: dict[str, np.ndarray], stats: CaptureStats
    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
        """Pause, drain, copy what is dirty, save state, resume; the parts' times go into `stats`."""
        clock = time.perf_counter
        paused_at = clock()
        stats.stop_kick_rounds = self.vm.pause()
        cpu_started = time.thread_time()
        try:
            drain_started = clock()
            stats.stop_s = drain_started - paused_at
            dirty = self._drain_dirty()
            copy_started = clock()
            stats.drain_s = copy_started - drain_started
            copies, stats.unbuffered_pages = _copy_pages(regions, _union(to_copy, dirty), self._copy_buffer)
            state_started = clock()
            stats.copy_s = state_started - copy_started
            state = self.vm.save_state()
        finally:
            resume_started, cpu_used = clock(), time.thread_time() - cpu_started
            self.vm.resume()
        resumed = clock()
        stats.state_s = resume_started - state_started
        stats.waiting_s = max(0.0, (resume_started - drain_started) - cpu_used)
        stats.resume_s = resumed - resume_started
        stats.pause_s = resumed - paused_at
        return copies, state

    def _precopy(self, writer, regions: list[_Source], needed: dict[str, np.ndarray], counts: dict[str, int]) -> int:
        """Write the needed pages from live memory; the pause rewrites those dirtied meanwhile."""
        batch_pages = PRECOPY_BATCH // PAGE_SIZE
        buffer = np.empty((batch_pages, PAGE_SIZE), dtype=np.uint8)
        written = 0
        for region in regions:
            live = np.frombuffer(region.view, dtype=np.uint8).reshape(region.pages, PAGE_SIZE)
            wanted = np.flatnonzero(needed[region.name])
            for start in range(0, len(wanted), batch_pages):
                pages = wanted[start : start + batch_pages]
                chunk = buffer[: len(pages)]
                gather_pages(live, pages, chunk)
                writer.put_region(region.name, region.size, chunk, pages=pages)
                written += len(pages)
                counts[region.name] = counts.get(region.name, 0) + len(pages)
        return written


def _count(mask: dict[str, np.ndarray]) -> int:
    return sum(int(m.sum()) for m in mask.values())


def _prefaulted_pages(count: int) -> np.ndarray:
    buffer = np.empty((count, PAGE_SIZE), dtype=np.uint8)
    buffer.fill(0)
    return buffer


def _union(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: a[name] | b[name] for name in a}


def _copy_pages(
    regions: list[_Source], masks: dict[str, np.ndarray], buffer: np.ndarray
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """Per region, the indices of the pages set in its mask and a private copy of
    them, packed into `buffer`; pages that do not fit go to fresh memory (slow: page
    faults), and their count is returned with the copies."""
    copies = {}
    used = unbuffered = 0
    for region in regions:
        pages = np.flatnonzero(masks[region.name])
        live = np.frombuffer(region.view, dtype=np.uint8).reshape(region.pages, PAGE_SIZE)
        if len(pages) == 0:
            copy = np.empty(0, dtype=np.uint8)  # a (0, page) slice is no buffer the store can take
        elif used + len(pages) <= len(buffer):
            copy = buffer[used : used + len(pages)]
            used += len(pages)
        else:
            copy = np.empty((len(pages), PAGE_SIZE), dtype=np.uint8)
            unbuffered += len(pages)
        gather_pages(live, pages, copy)
        copies[region.name] = (pages, copy)
    return copies, unbuffered
