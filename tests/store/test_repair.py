"""repair_index: packs whose index files were lost or damaged are indexed again from
their own bytes, so the snapshots that use them read back whole."""

from __future__ import annotations

import pytest

from snapvisor.store import RepositoryError
from snapvisor.store import format as fmt
from store_helpers import make_memory, object_listing, read_all


def replace(store, key, data):
    store.delete(key)
    store.put(key, data)


def two_snapshots(repo):
    snapshots = []
    for seed in (1, 2):
        mem = make_memory(96, seed=seed)
        with repo.start_snapshot() as writer:
            writer.put_region("ram0", mem.nbytes, mem)
            writer.put_blob("state", b"device state %d" % seed)
            snapshots.append((writer.commit("vm1"), mem))
    return snapshots


def index_keys(repo):
    return sorted(info.key for info in repo.store.list(fmt.INDEX_PREFIX))


def assert_readable(repo, snapshots):
    for info, mem in snapshots:
        snapshot = repo.get_snapshot(info.id)
        assert read_all(snapshot, "ram0") == mem.tobytes()
        assert snapshot.get_blob("state").startswith(b"device state")
    assert repo.verify(read_data=True).ok


def test_lost_index_files_are_rebuilt(repo):
    snapshots = two_snapshots(repo)
    for key in index_keys(repo):
        repo.store.delete(key)
    repo.refresh_index(full=True)
    with pytest.raises(RepositoryError, match="not in the repository index"):
        read_all(repo.get_snapshot(snapshots[0][0].id), "ram0")

    result = repo.repair_index()
    packs = [info.key for info in repo.store.list(fmt.DATA_PREFIX)]
    assert result.packs_reindexed == len(packs) and result.objects_reindexed > 0
    assert index_keys(repo) == [result.new_index_file]
    assert_readable(repo, snapshots)
    assert repo.repair_index().packs_reindexed == 0  # nothing left to do


def test_a_damaged_index_file_is_replaced(repo):
    snapshots = two_snapshots(repo)
    damaged = index_keys(repo)[0]
    data = bytearray(repo.store.get(damaged))
    data[-5] ^= 1
    replace(repo.store, damaged, bytes(data))

    result = repo.repair_index()
    assert result.damaged_index_files == [damaged] and result.index_files_read == 1
    assert result.new_index_file in index_keys(repo)
    for key in index_keys(repo):  # the damaged bytes are gone (the rebuilt file may have its name)
        fmt.decode_index(key, repo.store.get(key), repo.crypto)
    assert_readable(repo, snapshots)


def test_dry_run_changes_nothing(repo):
    snapshots = two_snapshots(repo)
    for key in index_keys(repo):
        repo.store.delete(key)
    before = object_listing(repo.store)
    result = repo.repair_index(dry_run=True)
    assert result.packs_reindexed > 0 and result.new_index_file is None
    assert object_listing(repo.store) == before
    assert snapshots


def test_a_pack_with_a_damaged_trailer_is_reported_and_kept(repo):
    two_snapshots(repo)
    for key in index_keys(repo):
        repo.store.delete(key)
    victim = sorted(info.key for info in repo.store.list(fmt.DATA_PREFIX))[0]
    data = bytearray(repo.store.get(victim))
    data[-1] ^= 0xFF  # the footer's checksum: the trailer cannot be trusted
    replace(repo.store, victim, bytes(data))

    result = repo.repair_index()
    assert [line.split(":")[0] for line in result.unreadable_packs] == [victim]
    assert "checksum" in result.unreadable_packs[0]
    assert repo.store.head(victim) == len(data)  # left in place, for a human to look at
    assert not repo.verify().ok  # the snapshots using it are still damaged, and say so
