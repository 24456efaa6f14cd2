"""A VMM killed right after a snapshot loses nothing; snapshots this host cannot
run are refused before anything starts."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import snapvisor
from guest_console import wait_for_rounds
from snapvisor.image.capture import STATE_BLOB
from snapvisor.image.compat import IncompatibleSnapshot, feature_words, parse_cpuid
from snapvisor.image.restore import host_cpuid
from snapvisor.store import Repository, SnapshotInfo

pytestmark = pytest.mark.kvm
HERE = Path(__file__).parent


def test_restore_after_sigkill_of_the_snapshotting_vmm(testguest: Path, tmp_path: Path) -> None:
    repo_url = str(tmp_path / "repo")
    child = subprocess.Popen(
        [sys.executable, str(HERE / "snapshot_and_hang.py"), repo_url, str(testguest)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])),
    )
    try:
        line = child.stdout.readline()
        assert line.startswith("SNAPSHOT "), line
        child.send_signal(signal.SIGKILL)  # right after the snapshot: no clean-up runs
    finally:
        child.kill()
        child.wait()
    snapshot_id = line.split()[1]

    out = io.BytesIO()
    with snapvisor.restore(repo_url, snapshot_id, serial_out=out) as vm:
        wait_for_rounds(out, 1, 3)
    repo = Repository.open_url(repo_url)
    assert repo.verify(read_data=True).ok


def _rewrite_meta(repo: Repository, source: SnapshotInfo, compat: dict) -> str:
    """A copy of `source` (same memory, same state) whose compatibility record says `compat`."""
    snapshot = repo.get_snapshot(source.id)
    with repo.start_snapshot(parent=source.id) as writer:
        for name, size in snapshot.regions.items():
            writer.put_region(name, size, b"", pages=np.array([], dtype=np.int64))
        writer.put_blob(STATE_BLOB, snapshot.get_blob(STATE_BLOB))
        return writer.commit(vm=source.vm, meta=dict(source.meta, compat=compat)).id


@pytest.fixture
def snapshotted(testguest: Path, tmp_path: Path) -> tuple[Repository, SnapshotInfo]:
    repo = Repository.open_url(str(tmp_path / "repo"), create=True)
    out = io.BytesIO()
    with snapvisor.VM.boot(testguest, mem="32M", cmdline="tg.mem=4 tg.rounds=0 tg.rate=10", serial_out=out) as vm:
        wait_for_rounds(out, 1, 1)
        info = vm.snapshot(repo)
    return repo, info


def test_snapshot_of_another_format_major_is_refused(snapshotted) -> None:
    repo, info = snapshotted
    compat = dict(info.meta["compat"], image_format={"major": 2, "minor": 0})
    newer = _rewrite_meta(repo, info, compat)
    with pytest.raises(IncompatibleSnapshot, match=r"image format 2\.0.*upgrade snapvisor"):
        snapvisor.restore(repo, newer)
    # The untouched snapshot still restores.
    snapvisor.restore(repo, info.id, start=False).close()


def test_snapshot_needing_missing_cpu_features_is_refused(snapshotted) -> None:
    repo, info = snapshotted
    host = feature_words(parse_cpuid(host_cpuid()))
    word = "0x7.0.ebx"
    lacking_bit = next(bit for bit in range(32) if not host.get(word, 0) >> bit & 1)
    features = dict(info.meta["compat"]["cpu_features"])
    features[word] = features.get(word, 0) | 1 << lacking_bit
    needs_more = _rewrite_meta(repo, info, dict(info.meta["compat"], cpu_features=features))
    with pytest.raises(IncompatibleSnapshot, match=rf"CPUID {word} bits {lacking_bit}\b.*newer CPU"):
        snapvisor.restore(repo, needs_more)
