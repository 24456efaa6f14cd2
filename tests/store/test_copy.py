"""Copying snapshots between repositories: unencrypted to encrypted, local to the S3
server; only the pages the destination lacks are written; an interrupted copy run
again finishes without copying anything twice."""

from __future__ import annotations

import numpy as np
import pytest

from snapvisor.store import Repository, open_backend
from snapvisor.store.copy import copy_snapshots

from store_helpers import SMALL_REPO, TEST_PASSWORD, make_memory, read_all
from test_crash_safety import Crash, CrashingStore


def _source(tmp_path, count: int = 3) -> tuple[Repository, list[str], list[np.ndarray]]:
    repo = Repository.init(open_backend(str(tmp_path / "source")), **SMALL_REPO)
    memory = make_memory(96, seed=3)
    ids, images = [], []
    for i in range(count):
        memory = memory.copy()
        memory[i * 4096 * 4:(i + 1) * 4096 * 4] = np.random.default_rng(i).integers(0, 256, 4 * 4096, np.uint8)
        with repo.start_snapshot() as writer:
            writer.put_region("ram0", memory.nbytes, memory)
            writer.put_region("disk-vda", 16 * 4096, bytes(16 * 4096))  # all zero
            writer.put_blob("vm-state", b"state %d" % i)
            ids.append(writer.commit("web1", tags=[f"n{i}"], meta={"kind": "full"}).id)
        images.append(memory)
    return repo, ids, images


def test_copy_to_an_encrypted_repository(backend, tmp_path) -> None:
    source, ids, images = _source(tmp_path)
    dest = Repository.init(backend, password=TEST_PASSWORD, **SMALL_REPO)
    result = copy_snapshots(source, dest, ids)
    assert list(result.copied) == ids and not result.skipped
    # Three snapshots differing in 4 pages each: the later ones add only those pages.
    assert result.pages_new < 96 + 2 * 4 + 4
    copies = {s.meta["copied_from"]["snapshot"]: s for s in dest.list_snapshots()}
    for sid, image in zip(ids, images):
        original, copy = source.get_snapshot(sid).info, copies[sid]
        assert (copy.vm, copy.time, copy.tags, copy.regions) == (original.vm, original.time, original.tags,
                                                                original.regions)
        snapshot = dest.get_snapshot(copy.id)
        assert read_all(snapshot, "ram0") == image.tobytes()
        assert read_all(snapshot, "disk-vda") == bytes(16 * 4096)
        assert snapshot.get_blob("vm-state") == source.get_snapshot(sid).get_blob("vm-state")
    assert dest.verify(read_data=True).ok
    again = copy_snapshots(source, dest, ids)
    assert not again.copied and list(again.skipped) == ids and again.bytes_written == 0


@pytest.mark.parametrize("crash_at", [1, 3, 6])
def test_an_interrupted_copy_resumes(tmp_path, crash_at: int) -> None:
    source, ids, images = _source(tmp_path)
    inner = open_backend(str(tmp_path / "dest"))
    Repository.init(inner, password=TEST_PASSWORD, **SMALL_REPO)
    crashing = Repository.open(CrashingStore(inner, crash_at), password=TEST_PASSWORD)
    with pytest.raises(Crash):
        copy_snapshots(source, crashing, ids)
    dest = Repository.open(inner, password=TEST_PASSWORD)
    done_before = {s.meta["copied_from"]["snapshot"] for s in dest.list_snapshots()}
    result = copy_snapshots(source, dest, ids)
    assert set(result.skipped) == done_before and set(result.copied) == set(ids) - done_before
    copies = {s.meta["copied_from"]["snapshot"]: s.id for s in dest.list_snapshots()}
    assert sorted(copies) == sorted(ids)  # each exactly once
    for sid, image in zip(ids, images):
        assert read_all(dest.get_snapshot(copies[sid]), "ram0") == image.tobytes()
    assert dest.verify(read_data=True).ok


def test_copy_from_encrypted_to_unencrypted_reads_pages_checked(tmp_path) -> None:
    """The other way round works too: pages get plain SHA-256 ids again."""
    source = Repository.init(open_backend(str(tmp_path / "sealed")), password=TEST_PASSWORD, **SMALL_REPO)
    memory = make_memory(64, seed=9)
    with source.start_snapshot() as writer:
        writer.put_region("ram0", memory.nbytes, memory)
        sid = writer.commit("db1").id
    dest = Repository.init(open_backend(str(tmp_path / "plain")), **SMALL_REPO)
    result = copy_snapshots(source, dest, [sid])
    assert read_all(dest.get_snapshot(result.copied[sid]), "ram0") == memory.tobytes()
