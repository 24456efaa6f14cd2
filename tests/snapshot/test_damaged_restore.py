"""`snapvisor restore` (eager and --lazy) of a snapshot with an unreadable object:
the process exits non-zero with an error naming the object, the snapshot and the
fix, every time, within a bounded time, without a traceback, and the guest never
runs on wrong memory. Each lazy case runs several times: the failure races the
guest's faults, the prefetcher and the VM's start differently each time.
(The same damage for every repository operation: tests/store/test_damaged_repository.py.)
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import snapvisor
from guest_console import wait_for_rounds
from snapvisor.image.restore import LAZY_FAILURE_EXIT
from snapvisor.store import Repository
from snapvisor.store import format as fmt
from snapvisor.store.manifest import snapshot_key

pytestmark = pytest.mark.kvm
CMDLINE = "console=ttyS0 tg.mem=64 tg.rate=10 tg.pages=256 tg.rounds=0"
LAZY_TRIES = 4
EXIT_WITHIN_S = 60  # from the start of the process: a restore of 128 MiB takes ~1 s here


@dataclass
class _Snapshot:
    repo: Path
    id: str


@pytest.fixture(scope="module")
def snapshot(testguest: Path, tmp_path_factory) -> _Snapshot:
    repo = tmp_path_factory.mktemp("damaged-restore") / "repo"
    out = io.BytesIO()
    vm = snapvisor.VM.boot(testguest, mem="128M", cmdline=CMDLINE, serial_out=out)
    try:
        wait_for_rounds(out, 1, 2)
        info = vm.snapshot(str(repo))
    finally:
        vm.stop()
        vm.close()
    return _Snapshot(repo, info.id)


def _frames(repo: Repository, kind: int) -> list[tuple[str, int, int]]:
    """(pack key, offset, length) of every frame of `kind`, in pack order."""
    index = repo.refresh_index(full=True)
    return [(pack.key, int(frame["offset"]), int(frame["clen"]))
            for pack in sorted(index.packs, key=lambda p: p.key) for frame in pack.frames if frame["kind"] == kind]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.unlink()
    path.write_bytes(bytes(data))


def _damage(root: Path, snapshot_id: str, case: str) -> str:
    """Damage the copy of the repository at `root`; returns the key the error must name."""
    repo = Repository.open_url(str(root))
    if case == "manifest":
        _flip(root / snapshot_key(snapshot_id), 0)
        return snapshot_key(snapshot_id)
    if case == "index":
        [key] = [info.key for info in repo.store.list(fmt.INDEX_PREFIX)]
        _flip(root / key, len((root / key).read_bytes()) // 2)
        return key
    if case == "pack missing":
        key = _frames(repo, fmt.KIND_PAGES)[-1][0]
        (root / key).unlink()
        return key
    kind, which = {"state blob": (fmt.KIND_BLOB, 0), "region root": (fmt.KIND_REGION_ROOT, 0),
                   "map block": (fmt.KIND_MAP_BLOCK, -1), "first pages": (fmt.KIND_PAGES, 0),
                   "last pages": (fmt.KIND_PAGES, -1)}[case]
    key, offset, length = _frames(repo, kind)[which]
    _flip(root / key, offset + length // 2)
    return key


def _restore(repo: Path, snapshot_id: str, cache: Path, *args: str) -> tuple[int, str, bytes, float]:
    """The CLI restore as an operator runs it, on a host that has not seen the
    repository (its own, empty, index cache)."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "snapvisor", "restore", "--repo", str(repo), snapshot_id, *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               env={**os.environ, "SNAPVISOR_CACHE": str(cache)})
    try:
        console, err = process.communicate(timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        process.kill()
        try:
            process.communicate(timeout=10)
            hung = "did not exit"
        except subprocess.TimeoutExpired:  # a vCPU or a KVM worker waiting on a fault that nobody serves
            hung = "did not exit, and cannot be killed"
        pytest.fail(f"snapvisor restore {' '.join(args)} {hung} within {EXIT_WITHIN_S} s")
    return process.returncode, err.decode(errors="replace"), console, time.monotonic() - started


CASES = ["first pages", "last pages", "pack missing", "map block", "region root", "state blob", "index", "manifest"]


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
@pytest.mark.parametrize("case", CASES)
def test_restore_of_a_damaged_snapshot_exits_with_the_error(snapshot: _Snapshot, tmp_path: Path, case: str,
                                                           lazy: bool) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(snapshot.repo, repo)
    key = _damage(repo, snapshot.id, case)
    for attempt in range(LAZY_TRIES if lazy else 1):
        args = ["--lazy", "--api-sock", str(tmp_path / f"api{attempt}.sock")] if lazy else []
        code, err, console, took = _restore(repo, snapshot.id, tmp_path / f"cache{attempt}", *args)
        where = f"attempt {attempt}, exit {code} after {took:.1f} s: {err[-3000:]}"
        assert "Traceback" not in err, where
        # 70: the lazy fill failed with the guest running; 1: refused before it started.
        assert code in ((LAZY_FAILURE_EXIT, 1) if lazy else (1,)), where
        assert "error: " in err and key in err and snapshot.id[:12] in err, where
        assert "`snapvisor verify" in err or "`snapvisor repair-index`" in err or "`snapvisor forget" in err, where
        if case == "index":
            assert "`snapvisor repair-index`" in err, where
        assert b"VERIFY FAIL" not in console, where  # the guest never saw a wrong page
        assert not (tmp_path / f"api{attempt}.sock").exists(), where
