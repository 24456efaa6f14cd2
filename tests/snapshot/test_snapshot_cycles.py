"""Snapshots of a running test guest, restored again and again: every restore
verifies every page the guest owns and its round counter continues from the
snapshot, across full and incremental snapshots, eager and lazy restores,
1 and 2 vCPUs, and local and S3 repositories."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

import snapvisor
from testsupport import s3_options
from guest_console import assert_healthy, last_rounds, rounds, wait_for_rounds
from snapvisor.store import Repository

pytestmark = pytest.mark.kvm
CYCLES = 5


def guest_cmdline(vcpus: int) -> str:
    # 8 MiB re-dirtied at 10 MiB/s per CPU, 1 MiB a round: ~10 rounds a second,
    # each followed by a check of every page the CPU owns.
    return f"console=ttyS0 tg.mem=8 tg.rate=10 tg.pages=256 tg.rounds=0 tg.cpus={vcpus}"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def repo(request, tmp_path) -> Repository:
    if request.param == "local":
        return Repository.open_url(str(tmp_path / "repo"), create=True)
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Repository.open_url(f"s3://{bucket}/cycles-{tmp_path.name}", create=True, **s3_options(server))


@pytest.mark.parametrize("vcpus", [1, 2])
def test_snapshot_restore_cycles(testguest: Path, repo: Repository, vcpus: int) -> None:
    out = io.BytesIO()
    vm = snapvisor.VM.boot(testguest, mem="64M", vcpus=vcpus, cmdline=guest_cmdline(vcpus), serial_out=out, name="cycler")
    taken = []
    try:
        wait_for_rounds(out, vcpus, 2)
        for cycle in range(CYCLES):
            # Two snapshots a few hundred ms apart while the guest writes; restore the later one.
            vm.snapshot(repo, tags=[f"cycle{cycle}"])
            first_full = vm.last_snapshot.full
            time.sleep(0.3)
            before = last_rounds(out.getvalue())
            info = vm.snapshot(repo)
            after = last_rounds(out.getvalue())
            assert vm.last_snapshot.full is False
            assert first_full is (cycle == 0)
            taken.append(info.id)
            vm.stop()
            vm.close()

            lazy = cycle % 2 == 1
            out = io.BytesIO()
            vm = snapvisor.restore(repo, info.id, lazy=lazy, serial_out=out)
            console = wait_for_rounds(out, vcpus, 2)
            for cpu in range(vcpus):
                resumed = min(r for c, r, _ in rounds(console) if c == cpu)
                # The counter goes on from the instant of the snapshot, not from zero.
                assert before[cpu] < resumed <= after[cpu] + 1, (cycle, cpu, before, resumed, after)
            if lazy:
                assert vm.lazy_memory is not None and vm.lazy_memory.wait(30)
                assert vm.lazy_memory.error is None
        # Any snapshot restores on its own, the oldest included: no chain replay.
        vm.stop()
        vm.close()
        out = io.BytesIO()
        vm = snapvisor.restore(repo, taken[0], serial_out=out)
        wait_for_rounds(out, vcpus, 2)
        assert_healthy(out.getvalue())
    finally:
        vm.close()
    kinds = [s.meta["kind"] for s in repo.list_snapshots()]
    assert kinds.count("full") == 1 and kinds.count("incremental") == 2 * CYCLES - 1
