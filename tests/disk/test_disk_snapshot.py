"""Disks in snapshots, with the real test guest writing seeded blocks to its
virtio-blk disk between snapshots: a restored guest reads back exactly what it
had written up to the snapshot and nothing it wrote after (it checks every
block against its block sequence table, which is guest memory captured in the
same pause); incremental snapshots store only the blocks written."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import snapvisor
from testsupport import s3_options
from disk_console import (CMDLINE, DISK_BLOCKS, allocated_bytes, blank_image, disk_rounds, snapshot_of_running_guest,
                          wait_for_disk_rounds)
from snapvisor.image.disks import DiskRestoreError
from snapvisor.image.restore import RestoreError
from snapvisor.store import PAGE_SIZE, Repository
from snapvisor.store.errors import StoreError
from snapvisor.store.format import DATA_PREFIX
from snapvisor.store.memory import MemoryStore
from snapvisor.vmm.devices.blockfile import DiskConfig

pytestmark = pytest.mark.kvm
MiB = 1 << 20
DISK_SIZE = 16 * MiB  # the guest uses its first 1 MiB


def _region_pages(repo: Repository, snapshot_id: str, name: str) -> np.ndarray:
    reader = repo.get_snapshot(snapshot_id).region_reader(name)
    out = np.zeros((reader.npages, PAGE_SIZE), dtype=np.uint8)
    reader.read_into(out)
    return out


@pytest.mark.parametrize(
    "where,lazy",
    [("local", False), ("local", True), pytest.param("s3", False, marks=pytest.mark.s3),
     pytest.param("s3", True, marks=pytest.mark.s3)],
    ids=["local-eager", "local-lazy", "s3-eager", "s3-lazy"],
)
def test_restored_guest_finds_the_disk_of_the_snapshot_instant(
    request, testguest: Path, tmp_path: Path, where: str, lazy: bool
) -> None:
    image = blank_image(tmp_path / "disk.img", DISK_SIZE)
    if where == "local":
        repo = Repository.open_url(str(tmp_path / "repo"), create=True)
    else:
        server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        repo = Repository.open_url(f"s3://{bucket}/disks-{tmp_path.name}", create=True, **s3_options(server))
    out = io.BytesIO()
    vm = snapvisor.VM.boot(testguest, mem="32M", cmdline=CMDLINE, serial_out=out, disks=[image])
    try:
        wait_for_disk_rounds(out, 3)
        first = vm.snapshot(repo)
        wait_for_disk_rounds(out, 3)
        second = vm.snapshot(repo)
        assert vm.last_snapshot.full is False
        at_second = len(disk_rounds(out.getvalue()))
        wait_for_disk_rounds(out, 3)  # the guest writes on after the last snapshot
        assert len(disk_rounds(out.getvalue())) > at_second
    finally:
        vm.stop()
        vm.close()
    final = image.read_bytes()

    for snapshot in (second, first):
        disk_dir = tmp_path / f"restored-{snapshot.short_id}"
        disk_dir.mkdir()
        out = io.BytesIO()
        restored = snapvisor.restore(repo, snapshot.id, lazy=lazy, serial_out=out, disk_dir=disk_dir, start=False)
        try:
            restored_image = disk_dir / "vda.img"
            if lazy:  # the image fills in behind the guest; here, before it starts
                assert restored.lazy_disks.wait(30) and restored.lazy_disks.error is None
            # What the snapshot stored, before the guest touches it again:
            # not the image as the first VM left it.
            assert restored_image.read_bytes()[: DISK_BLOCKS * PAGE_SIZE] != final[: DISK_BLOCKS * PAGE_SIZE]
            assert allocated_bytes(restored_image) <= 2 * DISK_BLOCKS * PAGE_SIZE  # sparse: zero blocks are holes
            restored.vm.start()
            # Every round re-reads all its blocks and checks each against the seq table
            # restored with memory: a block from after the snapshot, or one missing, fails.
            console = wait_for_disk_rounds(out, 3)
            assert all(written == 8 for _, written, _ in disk_rounds(console))
        finally:
            restored.stop()
            restored.close()


def test_incremental_disk_snapshot_stores_only_the_written_blocks(testguest: Path, tmp_path: Path) -> None:
    image = blank_image(tmp_path / "disk.img", DISK_SIZE)
    repo = Repository.open_url(str(tmp_path / "repo"), create=True)
    out = io.BytesIO()
    vm = snapvisor.VM.boot(testguest, mem="32M", cmdline=CMDLINE, serial_out=out, disks=[image])
    try:
        wait_for_disk_rounds(out, 2)
        first = vm.snapshot(repo)
        first_stats = vm.last_snapshot
        wait_for_disk_rounds(out, 4)
        second = vm.snapshot(repo)
        second_stats = vm.last_snapshot
    finally:
        vm.stop()
        vm.close()
    before = _region_pages(repo, first.id, "disk-vda")
    after = _region_pages(repo, second.id, "disk-vda")
    written_between = int((before != after).any(axis=1).sum())
    assert written_between >= 8  # four rounds of 8 writes, some blocks hit twice
    # The full snapshot looked only at blocks holding data (not the 4096 of the image) ...
    assert first_stats.region_pages["disk-vda"] <= DISK_BLOCKS
    assert int(before.any(axis=1).sum()) == first_stats.region_pages["disk-vda"]
    # ... and the incremental one stored exactly the blocks written in between.
    stored = second_stats.region_pages["disk-vda"] * PAGE_SIZE
    assert stored == written_between * PAGE_SIZE, (stored, written_between)
    assert not after[DISK_BLOCKS:].any()  # the guest never wrote past its blocks


def test_command_line_announces_every_disk(tmp_path: Path, testguest: Path) -> None:
    from snapvisor.vmm.builder import VmConfig, build_microvm_for_boot

    disks = [DiskConfig(blank_image(tmp_path / f"{n}.img", MiB), readonly=n == 1) for n in range(2)]
    vm = build_microvm_for_boot(VmConfig(kernel=testguest, mem_size=16 * MiB, cmdline="console=ttyS0", disks=disks))
    try:
        # where the loaders put the command line (docs/architecture.md), as Linux reads it
        cmdline = vm.memory.read(0x20000, 4096).split(b"\0")[0].decode()
        assert cmdline == (
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        )
        assert [d["name"] for d in vm.config["disks"]] == ["vda", "vdb"]
    finally:
        vm.close()


def test_read_only_disk_is_not_written(testguest: Path, tmp_path: Path) -> None:
    image = blank_image(tmp_path / "ro.img", MiB)
    out = io.BytesIO()
    vm = snapvisor.VM.boot(testguest, mem="32M", cmdline=CMDLINE, serial_out=out,
                           disks=[DiskConfig(image, readonly=True)])
    try:
        status = vm.wait(30)
    finally:
        vm.close()
    assert status is not None and status.code == 3, out.getvalue()[-500:]
    assert b"tg: DISK FAIL write" in out.getvalue() and b"status=1" in out.getvalue()  # VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == bytes(MiB)


def test_restore_of_a_snapshot_with_disks_needs_a_place_for_them(testguest: Path, tmp_path: Path) -> None:
    image = blank_image(tmp_path / "disk.img", MiB)
    repo = Repository.open_url(str(tmp_path / "repo"), create=True)
    info = snapshot_of_running_guest(testguest, repo, image, 1)
    with pytest.raises(RestoreError, match=r"has disks \(vda\).*disk_dir"):
        snapvisor.restore(repo, info.id)
    with pytest.raises(RestoreError, match=r"has no disk vdb \(its disks: vda\)"):
        snapvisor.restore(repo, info.id, disk_paths={"vdb": tmp_path / "b.img"})
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "vda.img").write_bytes(b"keep me")
    with pytest.raises(DiskRestoreError, match="already exists"):
        snapvisor.restore(repo, info.id, disk_dir=taken)
    assert (taken / "vda.img").read_bytes() == b"keep me"


class _FailingUploads(MemoryStore):
    """An in-memory object store whose data uploads fail while `failing` is set."""

    failing = False

    def put(self, key: str, data) -> bool:
        if self.failing and key.startswith(DATA_PREFIX):
            raise StoreError(f"{key}: injected upload failure")
        return super().put(key, data)


def test_failed_snapshot_loses_no_written_blocks(testguest: Path, tmp_path: Path) -> None:
    store = _FailingUploads()
    repo = Repository.init(store)
    image = blank_image(tmp_path / "disk.img", DISK_SIZE)
    out = io.BytesIO()
    vm = snapvisor.VM.boot(testguest, mem="32M", cmdline=CMDLINE, serial_out=out, disks=[image])
    try:
        wait_for_disk_rounds(out, 2)
        vm.snapshot(repo)
        wait_for_disk_rounds(out, 3)  # blocks written here reach only the failed snapshot's drain
        store.failing = True
        with pytest.raises(StoreError):
            vm.snapshot(repo)
        store.failing = False
        wait_for_disk_rounds(out, 2)
        last = vm.snapshot(repo)
        assert vm.last_snapshot.full is False
    finally:
        vm.stop()
        vm.close()
    disk_dir = tmp_path / "restored"
    disk_dir.mkdir()
    out = io.BytesIO()
    restored = snapvisor.restore(repo, last.id, serial_out=out, disk_dir=disk_dir)
    try:
        wait_for_disk_rounds(out, 2)  # every block checked against the restored seq table
    finally:
        restored.stop()
        restored.close()


def test_disks_cloned_from_one_base_image_are_stored_once(testguest: Path, tmp_path: Path) -> None:
    base = np.random.default_rng(5).integers(0, 256, 2 * MiB, dtype=np.uint8).tobytes()
    repo = Repository.open_url(str(tmp_path / "repo"), create=True)
    roots, new_pages = [], []
    for clone in ("a", "b"):
        image = tmp_path / f"{clone}.img"
        image.write_bytes(base)
        vm = snapvisor.VM.boot(testguest, mem="32M", cmdline="console=ttyS0 tg.mem=4 tg.rounds=0 tg.rate=10",
                               serial_out=io.BytesIO(), disks=[image])
        try:
            info = vm.snapshot(repo)
            stats = vm.last_snapshot
        finally:
            vm.stop()
            vm.close()
        assert stats.region_pages["disk-vda"] == len(base) // PAGE_SIZE
        roots.append(repo.get_snapshot(info.id).manifest.region_refs["disk-vda"].root)
        new_pages.append(stats.store["pages_new"])
    # Content addressing: the same blocks give the same page ids, map blocks and region
    # root, so the second clone's disk is the first one's objects, stored once (how
    # much of the second snapshot is new depends on how far its memory workload got).
    assert roots[0] == roots[1]
    assert new_pages[0] >= len(base) // PAGE_SIZE  # the first clone stored the blocks


def test_device_access_to_guest_ram_during_a_lazy_restore_does_not_hang(testguest: Path, tmp_path: Path) -> None:
    # Devices read rings and write buffers from Python. During a lazy restore, a
    # page not yet in would fault while that thread holds the GIL, which the fault
    # handler needs: a hang, unless GuestMemory brings the range in first.
    image = blank_image(tmp_path / "disk.img", MiB)
    repo_path = tmp_path / "repo"
    repo = Repository.open_url(str(repo_path), create=True)
    out = io.BytesIO()
    vm = snapvisor.VM.boot(testguest, mem="256M", cmdline=CMDLINE.replace("tg.mem=4", "tg.mem=200"),
                           serial_out=out, disks=[image])
    try:
        wait_for_disk_rounds(out, 1, timeout=60)
        info = vm.snapshot(repo)
    finally:
        vm.stop()
        vm.close()
    disk_dir = tmp_path / "restored"
    disk_dir.mkdir()
    deep_in_the_working_set = 200 * MiB
    child = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("lazy_touch_child.py")), str(repo_path), info.id,
         str(disk_dir), hex(deep_in_the_working_set)],
        capture_output=True, text=True, timeout=60,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert int(child.stdout, 16) != 0  # the page's data, fetched for the read
