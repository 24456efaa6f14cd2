"""The snapshot pause: it does not wait on the store pipeline, and its copy works
for every source, one with nothing dirty included.

A repository whose uploads are deliberately slow and hold the GIL (one long C
call, as a compressor or hasher that does not release it would) keeps uploading
packs of the pre-copy long after the pre-copy ends. The pause must not overlap
any of that work: no upload runs while the VM is paused, and the pause stays far
shorter than one upload.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
from guest_console import wait_for_rounds

import snapvisor
from snapvisor.store import Repository
from snapvisor.store import format as fmt
from snapvisor.store.local import LocalStore
from snapvisor.vmm.devices.blockfile import DiskConfig
from snapvisor.vmm.vm import Vm

pytestmark = pytest.mark.kvm

# Summing this range is one C call that holds the GIL throughout: ~0.1-0.5 s here.
GIL_HOLD_RANGE = 10_000_000


class GilHoldingStore(LocalStore):
    """A local directory whose pack uploads first hold the GIL for a while, and
    which records every upload that ran while `vm` was paused."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.vm: Vm | None = None
        self.hold_seconds: list[float] = []
        self.during_pause: list[str] = []
        self._lock = threading.Lock()

    def put(self, key: str, data) -> bool:
        if not key.startswith(fmt.DATA_PREFIX):
            return super().put(key, data)
        paused_at_start = self.vm is not None and self.vm.paused
        started = time.perf_counter()
        sum(range(GIL_HOLD_RANGE))
        held = time.perf_counter() - started
        paused_at_end = self.vm is not None and self.vm.paused
        with self._lock:
            self.hold_seconds.append(held)
            if paused_at_start or paused_at_end:
                self.during_pause.append(key)
        return super().put(key, data)


def test_pause_does_not_wait_on_slow_uploads(testguest: Path, tmp_path: Path) -> None:
    store = GilHoldingStore(str(tmp_path / "repo"))
    # Small packs: the full snapshot's pre-copy (~24 MiB of pages the guest wrote)
    # leaves a backlog of uploads that outlasts it.
    repo = Repository.init(store, pack_size=2 << 20)
    out = io.BytesIO()
    with snapvisor.VM.boot(testguest, mem="128M", cmdline="tg.mem=24 tg.rate=0 tg.rounds=0 tg.verify=1000000",
                           serial_out=out) as vm:
        wait_for_rounds(out, 1, 1)
        store.vm = vm.vm
        info = vm.snapshot(repo)
        stats = vm.last_snapshot
    assert stats.full and stats.precopy_pages > 0, "the first snapshot pre-copies"
    assert len(store.hold_seconds) >= 6, "enough uploads to still be running at the pause"
    assert store.during_pause == [], f"uploads ran while the VM was paused: {store.during_pause}"
    # Generous: the pause copies a few MiB; one upload holds the GIL for far longer.
    assert stats.pause_s < min(store.hold_seconds), (stats.pause_s, min(store.hold_seconds))
    assert info.id in repo.snapshot_ids()


def test_a_source_with_nothing_dirty_in_the_pause(testguest: Path, tmp_path: Path) -> None:
    """The pause's copy of a source with no dirty page (here a disk the guest never
    writes, beside RAM the guest writes) is an empty copy the store takes."""
    image = tmp_path / "idle.img"
    image.write_bytes(bytes(1 << 20))
    repo = Repository.open_url(str(tmp_path / "repo"), create=True)
    out = io.BytesIO()
    with snapvisor.VM.boot(testguest, mem="64M", cmdline="tg.mem=4 tg.rate=1 tg.rounds=0", serial_out=out,
                           disks=[DiskConfig(image)]) as vm:
        wait_for_rounds(out, 1, 1)
        vm.snapshot(repo)
        incremental = vm.snapshot(repo)
        stats = vm.last_snapshot
    assert not stats.full and stats.paused_pages > 0
    assert stats.region_pages.get("disk-vda", 0) == 0
    assert incremental.regions["disk-vda"] == 1 << 20
