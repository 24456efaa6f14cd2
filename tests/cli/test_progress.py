"""Long work says how far it is, for the CLI's progress line: a restore's reads
(memory and disks), verify --read-data's packs, gc's deletes."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest

import snapvisor
from cli_helpers import GUEST_CMDLINE, snapvisor as snapvisor_cli, wait_for_rounds
from snapvisor.store import PAGE_SIZE, KeepPolicy, Repository
from snapvisor.store.reader import reporting_progress


class Recorder:
    """A Progress that keeps the total and the bytes done (advanced from worker threads)."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.done = 0
        self._lock = threading.Lock()

    def start(self, total: int) -> None:
        self.total, self.done = total, 0

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n


def test_region_reads_verify_and_gc_report_their_bytes(tmp_path: Path) -> None:
    path = str(tmp_path / "repo")
    rng = np.random.default_rng(3)
    with Repository.open_url(path, create=True, pack_size=1 << 20) as repo:
        for vm in ("web1", "web1", "web1"):
            memory = np.zeros(2048 * PAGE_SIZE, dtype=np.uint8)  # 8 MiB, half of it zero pages
            memory[:1024 * PAGE_SIZE] = rng.integers(0, 255, size=1024 * PAGE_SIZE, dtype=np.uint8)
            with repo.start_snapshot() as writer:
                writer.put_region("ram0", memory.size, memory)
                info = writer.commit(vm=vm)

        recorder = Recorder()
        out = bytearray(2048 * PAGE_SIZE)
        with reporting_progress(recorder):
            repo.get_snapshot(info.id).region_reader("ram0").read_into(out, threads=4)
        assert recorder.done == len(out) and bytes(out) == memory.tobytes()

        recorder = Recorder()
        with reporting_progress(recorder):
            assert repo.verify(read_data=True).ok
        assert recorder.total == recorder.done == sum(f.stat().st_size for f in (tmp_path / "repo" / "data").rglob("*")
                                                      if f.is_file())

        repo.prune(KeepPolicy(last=1))
        recorder = Recorder()
        with reporting_progress(recorder):
            result = repo.gc()
        assert result.packs_deleted and recorder.total == recorder.done == result.bytes_deleted

    # Not a terminal: the command line stays quiet on stderr.
    verify = snapvisor_cli("verify", "--repo", path, "--read-data")
    assert verify.returncode == 0 and verify.stderr == ""


@pytest.mark.kvm
def test_restore_reports_the_memory_and_disks_it_reads(testguest: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"data" * (1 << 18) + bytes(3 << 20))  # 4 MiB, 1 MiB of it written
    out = io.BytesIO()
    vm = snapvisor.VM.boot(testguest, mem="32M", cmdline=GUEST_CMDLINE, serial_out=out, disks=[disk])
    try:
        wait_for_rounds(out, 1, 1)
        info = vm.snapshot(str(tmp_path / "repo"))
    finally:
        vm.close()
    # lazy reads nothing before the VM is returned: memory and disks come in behind the guest
    for lazy, total in ((False, (32 << 20) + (4 << 20)), (True, None)):
        recorder = Recorder()
        disk_dir = tmp_path / f"disks-{lazy}"
        disk_dir.mkdir()
        restored = snapvisor.restore(str(tmp_path / "repo"), info.id, lazy=lazy, start=False, serial_out=io.BytesIO(),
                                     disk_dir=disk_dir, progress=recorder)
        restored.close()
        assert recorder.total == total and recorder.done == (total or 0)
