"""Lazy disks with the real test guest: a lazy restore starts the guest while its
disk, which holds data, still comes in from the repository (read here through a
slow link, so that the fill takes seconds); the guest reads and writes it
meanwhile and checks every block of its workload each round against its seq
table (guest memory of the same instant). Snapshots taken during the fill, and
a migration, and a repository that loses its packs during it, are covered too. Bookkeeping
details: test_lazy_disk.py."""

from __future__ import annotations

import io
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import snapvisor
from disk_console import CMDLINE, DISK_BLOCKS, blank_image, snapshot_of_running_guest, wait_for_disk_rounds
from snapvisor.image.disks import attached_disks
from snapvisor.image.restore import LAZY_FAILURE_EXIT
from snapvisor.migrate import Received, listen, migrate, receive
from snapvisor.store import PAGE_SIZE, Repository
from snapvisor.store.format import DATA_PREFIX
from snapvisor.store.local import LocalStore
from snapvisor.vmm.extents import populated_pages

pytestmark = pytest.mark.kvm
MiB = 1 << 20
DISK_SIZE = 64 * MiB
DATA_FROM = 16 * MiB  # the guest's workload uses the first 1 MiB; 16 MiB..64 MiB hold data
LINK_BYTES_PER_S = 10e6


class _SlowLink(LocalStore):
    """A repository directory read over a slow link: pack reads take their time."""

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if key.startswith(DATA_PREFIX) and length:
            time.sleep(length / LINK_BYTES_PER_S)
        return super().get(key, offset, length)


def _slow(path: Path) -> Repository:
    return Repository.open(_SlowLink(str(path)))


@dataclass
class _Snapshot:
    repo: Path
    id: str
    eager: Path  # the disk as an eager restore writes it: the disk at the snapshot instant


@pytest.fixture(scope="module")
def snapshot(testguest: Path, tmp_path_factory) -> _Snapshot:
    """A snapshot of the guest running its disk workload on a disk that also holds
    48 MiB of data (with a few zero blocks among it), and its eager restore."""
    base = tmp_path_factory.mktemp("lazy-disk")
    image = blank_image(base / "disk.img", DISK_SIZE)
    data = np.random.default_rng(11).integers(0, 256, ((DISK_SIZE - DATA_FROM) // PAGE_SIZE, PAGE_SIZE), dtype=np.uint8)
    data[::97] = 0
    with image.open("r+b") as file:
        file.seek(DATA_FROM)
        file.write(data.tobytes())
    repo = Repository.open_url(str(base / "repo"), create=True)
    info = snapshot_of_running_guest(testguest, repo, image, 3, CMDLINE)
    eager_dir = base / "eager"
    eager_dir.mkdir()
    snapvisor.restore(repo, info.id, start=False, serial_out=io.BytesIO(), disk_dir=eager_dir).close()
    return _Snapshot(base / "repo", info.id, eager_dir / "vda.img")


def _blocks(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8).reshape(-1, PAGE_SIZE)


def _populated(path: Path) -> np.ndarray:
    with path.open("rb") as file:
        return populated_pages(file.fileno(), DISK_SIZE)


def _restore_eagerly_and_verify(repo: Path, snapshot_id: str, disk_dir: Path, eager: Path) -> None:
    """Restore `snapshot_id` eagerly: its data past the workload's blocks is the
    original snapshot's, and the guest verifies the workload's blocks against the
    seq table of that instant."""
    disk_dir.mkdir()
    out = io.BytesIO()
    restored = snapvisor.restore(str(repo), snapshot_id, serial_out=out, disk_dir=disk_dir, start=False)
    try:
        assert (_blocks(disk_dir / "vda.img")[DISK_BLOCKS:] == _blocks(eager)[DISK_BLOCKS:]).all()
        restored.vm.start()
        wait_for_disk_rounds(out, 2)
    finally:
        restored.stop()
        restored.close()


def test_guest_runs_before_its_disk_is_in_and_the_image_ends_as_an_eager_restore(
    snapshot: _Snapshot, tmp_path: Path
) -> None:
    out = io.BytesIO()
    vm = snapvisor.restore(_slow(snapshot.repo), snapshot.id, lazy=True, serial_out=out, disk_dir=tmp_path)
    try:
        assert vm.lazy_disks is not None
        wait_for_disk_rounds(out, 1)  # it read every block of its workload back, and each was right ...
        assert not vm.lazy_disks.done  # ... while the disk was still coming in
        assert vm.lazy_disks.wait(60) and vm.lazy_disks.error is None
        wait_for_disk_rounds(out, 2)  # and it goes on verifying
        vm.pause()
        written = attached_disks(vm.vm)["vda"].fetch_dirty()  # by the guest since the restore
    finally:
        vm.stop()
        vm.close()
    assert vm.lazy_disks.blocks_on_demand > 0 and vm.lazy_disks.blocks_in_background > 0
    assert written.any() and not written[DISK_BLOCKS:].any()
    lazy, eager = tmp_path / "vda.img", snapshot.eager
    assert (_blocks(lazy)[~written] == _blocks(eager)[~written]).all()
    # Zero blocks stayed holes: the image is as sparse as the eager one (which the
    # file system may make less so: ext4 fills small gaps between written blocks).
    populated = _populated(lazy) & ~written
    assert populated.sum() <= (_populated(eager) & ~written).sum()
    assert not populated[DISK_BLOCKS : DATA_FROM // PAGE_SIZE].any()


def test_closing_a_vm_before_its_disk_is_in_completes_the_image(snapshot: _Snapshot, tmp_path: Path) -> None:
    vm = snapvisor.restore(_slow(snapshot.repo), snapshot.id, lazy=True, serial_out=io.BytesIO(), disk_dir=tmp_path,
                           start=False)
    assert not vm.lazy_disks.done
    vm.close()  # the image is the disk whoever attaches it next gets: it must be whole
    assert vm.lazy_disks.done and vm.lazy_disks.error is None
    assert (tmp_path / "vda.img").read_bytes() == snapshot.eager.read_bytes()


def test_writes_and_an_incremental_snapshot_during_the_fill(snapshot: _Snapshot, tmp_path: Path) -> None:
    repo = _slow(snapshot.repo)
    out = io.BytesIO()
    vm = snapvisor.restore(repo, snapshot.id, lazy=True, serial_out=out, disk_dir=tmp_path)
    try:
        wait_for_disk_rounds(out, 2)  # 8 whole-block writes a round, into blocks not all in yet
        incremental = vm.snapshot(repo)  # the blocks the guest wrote: all in, nothing to wait for
        assert vm.last_snapshot.full is False and not vm.lazy_disks.done
        assert vm.lazy_disks.wait(60) and vm.lazy_disks.error is None
        # What it wrote during the fill survived it: every block checks against the seq table.
        wait_for_disk_rounds(out, 2)
    finally:
        vm.stop()
        vm.close()
    _restore_eagerly_and_verify(snapshot.repo, incremental.id, tmp_path / "again", snapshot.eager)


def test_a_full_snapshot_during_the_fill_waits_for_it(snapshot: _Snapshot, tmp_path: Path) -> None:
    repo = _slow(snapshot.repo)
    out = io.BytesIO()
    vm = snapvisor.restore(repo, snapshot.id, lazy=True, serial_out=out, disk_dir=tmp_path)
    try:
        wait_for_disk_rounds(out, 1)
        assert not vm.lazy_disks.done
        full = vm.snapshot(repo, full=True)  # reads the whole disk: after the fill
        assert vm.last_snapshot.full and vm.lazy_disks.done and vm.lazy_disks.error is None
    finally:
        vm.stop()
        vm.close()
    _restore_eagerly_and_verify(snapshot.repo, full.id, tmp_path / "again", snapshot.eager)


def test_a_migration_during_the_fill_waits_for_it(snapshot: _Snapshot, tmp_path: Path) -> None:
    out_a, out_b = io.BytesIO(), io.BytesIO()
    vm = snapvisor.restore(_slow(snapshot.repo), snapshot.id, lazy=True, serial_out=out_a, disk_dir=tmp_path)
    listener = listen("127.0.0.1:0")
    (tmp_path / "b").mkdir()
    arrived: list[Received] = []
    fill_done_at_connect: list[bool] = []
    receiver = threading.Thread(target=lambda: arrived.append(receive(
        listener, serial_out=out_b, disk_dir=tmp_path / "b",
        on_connect=lambda peer: fill_done_at_connect.append(vm.lazy_disks.done))))
    receiver.start()
    try:
        wait_for_disk_rounds(out_a, 1)
        assert not vm.lazy_disks.done
        host, port = listener.getsockname()
        migrate(vm, f"{host}:{port}")  # sends the disk whole: only once it is in
        receiver.join(60)
    finally:
        vm.close()
    assert fill_done_at_connect == [True] and vm.lazy_disks.error is None
    moved = arrived[0].machine
    try:
        wait_for_disk_rounds(out_b, 2)  # the guest goes on on B and verifies its blocks there
        assert (_blocks(tmp_path / "b" / "vda.img")[DISK_BLOCKS:] == _blocks(snapshot.eager)[DISK_BLOCKS:]).all()
    finally:
        moved.stop()
        moved.close()


def test_packs_lost_during_the_fill_stop_the_vm_and_serve_no_wrong_data(
    snapshot: _Snapshot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo_path = tmp_path / "repo"
    shutil.copytree(snapshot.repo, repo_path)
    out = io.BytesIO()
    vm = snapvisor.restore(_slow(repo_path), snapshot.id, lazy=True, serial_out=out, disk_dir=tmp_path, start=False)
    try:
        assert vm.lazy_memory.wait(60) and vm.lazy_memory.error is None  # memory is in; the disk is not
        packs = [path for path in (repo_path / DATA_PREFIX).rglob("*") if path.is_file()]
        assert packs
        for pack in packs:
            pack.unlink()
        vm.vm.start()
        status = vm.wait(30)
    finally:
        vm.close()
    assert status is not None and (status.code, status.reason) == (LAZY_FAILURE_EXIT, "error"), status
    assert f"lazy restore of snapshot {snapshot.id[:8]}" in status.message
    assert "could not fetch disk blocks: disk vda, blocks" in status.message
    assert "is missing from" in status.message and "the VM was stopped" in status.message
    assert b"VERIFY FAIL" not in out.getvalue()  # the guest never saw a wrong block
    assert vm.lazy_disks.done and vm.lazy_disks.error is not None
    assert f"disk image {tmp_path / 'vda.img'} of a lazy restore is incomplete" in caplog.text
    # What reached the image is the snapshot's (past the blocks the guest itself writes).
    lazy, eager = _blocks(tmp_path / "vda.img")[DISK_BLOCKS:], _blocks(snapshot.eager)[DISK_BLOCKS:]
    has_data = lazy.any(axis=1)
    assert (lazy[has_data] == eager[has_data]).all() and has_data.sum() < eager.any(axis=1).sum()
