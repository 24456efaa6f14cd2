"""prune with restic's keep-* semantics, and gc reclaiming what nothing references."""

import os
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from snapvisor.store import KeepPolicy, Repository, RepositoryError, open_backend
from snapvisor.store.manifest import SnapshotInfo
from snapvisor.store.retention import apply_policy

from store_helpers import make_memory, object_listing, read_all

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def series(times, vm="vm1"):
    return [SnapshotInfo(f"{i:064x}", t, vm, [], None, {}, {}) for i, t in enumerate(times)]


def kept(policy, snaps):
    return sorted(s.time for s in apply_policy(snaps, policy).keep)


def test_keep_last():
    snaps = series([T0 + timedelta(hours=h) for h in range(10)])
    assert kept(KeepPolicy(last=3), snaps) == [T0 + timedelta(hours=h) for h in (7, 8, 9)]


def test_keep_daily_takes_newest_of_each_recent_day():
    snaps = series([T0 + timedelta(hours=6 * i) for i in range(20)])  # 5 days, 4 a day
    assert kept(KeepPolicy(daily=3), snaps) == [
        T0 + timedelta(days=d, hours=18) for d in (2, 3, 4)]


def test_rules_combine_as_union_with_reasons():
    snaps = series([T0 + timedelta(hours=6 * i) for i in range(20)])
    result = apply_policy(snaps, KeepPolicy(last=2, daily=2))
    times = sorted(s.time for s in result.keep)
    newest, second = snaps[-1], snaps[-2]
    assert times == [T0 + timedelta(days=3, hours=18), second.time, newest.time]
    assert result.reasons[newest.id] == ["last snapshot", "daily snapshot"]
    assert result.reasons[second.id] == ["last snapshot"]
    assert len(result.remove) == 17


def test_weekly_monthly_yearly_and_gaps():
    # One snapshot a day for two years; the buckets with no snapshot do not count.
    days = [T0 + timedelta(days=d) for d in range(730) if not 40 <= d < 100]
    snaps = series(days)
    weekly = kept(KeepPolicy(weekly=4), snaps)
    assert len(weekly) == 4 and all(t.isoweekday() == 7 for t in weekly[:-1])
    monthly = kept(KeepPolicy(monthly=30), snaps)
    months = [(t.year, t.month) for t in monthly]
    assert len(monthly) == 23  # 24 months minus March 2026, which has no snapshot
    assert len(set(months)) == len(months)
    assert all(not any((d.year, d.month) == (t.year, t.month) and d > t for d in days)
               for t in monthly)  # the newest of each month
    assert kept(KeepPolicy(yearly=5), snaps) == [datetime(2026, 12, 31, tzinfo=timezone.utc),
                                                 days[-1]]


def test_hourly_unlimited_and_within():
    snaps = series([T0 + timedelta(minutes=20 * i) for i in range(12)])  # 4 hours
    assert len(kept(KeepPolicy(hourly=-1), snaps)) == 4
    within = kept(KeepPolicy(within=timedelta(minutes=45)), snaps)
    assert within == [T0 + timedelta(minutes=m) for m in (180, 200, 220)]


def test_empty_policy_refused(repo):
    with pytest.raises(RepositoryError, match="keep policy is empty"):
        repo.prune(KeepPolicy())


def snapshot(repo, mem, vm):
    with repo.start_snapshot() as w:
        w.put_region("ram0", mem.nbytes, mem)
        return w.commit(vm)


def test_prune_per_vm_then_gc_reclaims(repo):
    rng = np.random.default_rng(0)
    infos = {}
    for vm in ("a", "b"):
        for i in range(3):
            mem = rng.integers(0, 256, 48 * 4096, dtype=np.uint8)
            infos[(vm, i)] = (snapshot(repo, mem, vm), mem)
    before = object_listing(repo.store)
    dry = repo.prune(KeepPolicy(last=1), dry_run=True)
    assert object_listing(repo.store) == before and dry.dry_run
    result = repo.prune(KeepPolicy(last=1), vm="a")
    assert {s.id for s in result.remove} == {infos[("a", i)][0].id for i in (0, 1)}
    assert {s.vm for s in repo.list_snapshots()} == {"a", "b"}
    assert len(repo.list_snapshots()) == 4

    size_before = sum(v for k, v in object_listing(repo.store).items() if k.startswith("data/"))
    plan = repo.gc(dry_run=True)
    assert plan.packs_deleted > 0 and object_listing(repo.store) == object_listing(repo.store)
    result = repo.gc()
    size_after = sum(v for k, v in object_listing(repo.store).items() if k.startswith("data/"))
    assert result.bytes_deleted == size_before - size_after > 2 * 48 * 4096 * 0.9
    for key in [("a", 2), ("b", 0), ("b", 1), ("b", 2)]:
        info, mem = infos[key]
        assert read_all(repo.get_snapshot(info.id), "ram0") == mem.tobytes()
    assert repo.verify(read_data=True).ok
    again = repo.gc()
    assert again.packs_deleted == 0


def test_gc_keeps_data_shared_with_a_surviving_snapshot(repo):
    mem = make_memory(96, seed=8)
    first = snapshot(repo, mem, "vm1")
    second = snapshot(repo, mem, "vm2")  # everything deduplicated against the first
    repo.delete_snapshot(first.id)
    result = repo.gc()
    assert result.packs_deleted == 0
    assert read_all(repo.get_snapshot(second.id), "ram0") == mem.tobytes()


def test_gc_dry_run_changes_nothing(repo):
    mem = make_memory(64, seed=9)
    info = snapshot(repo, mem, "vm1")
    repo.delete_snapshot(info.id)
    before = object_listing(repo.store)
    plan = repo.gc(dry_run=True)
    assert plan.dry_run and plan.packs_deleted > 0
    assert object_listing(repo.store) == before
    repo.gc()
    assert not [k for k in object_listing(repo.store) if k.startswith(("data/", "index/"))]


def test_gc_repacks_mostly_garbage_packs(repo):
    rng = np.random.default_rng(11)
    old = rng.integers(0, 256, (96, 4096), dtype=np.uint8)
    first = snapshot(repo, old.reshape(-1), "vm1")
    # The second snapshot keeps every 8th page of the first and adds new ones.
    new = rng.integers(0, 256, (96, 4096), dtype=np.uint8)
    new[::8] = old[::8]
    second = snapshot(repo, new.reshape(-1), "vm1")
    repo.delete_snapshot(first.id)
    data_before = sum(v for k, v in object_listing(repo.store).items() if k.startswith("data/"))
    plan = repo.gc(dry_run=True)
    assert plan.packs_repacked > 0
    result = repo.gc()
    assert result.packs_repacked == plan.packs_repacked and result.bytes_repacked > 0
    data_after = sum(v for k, v in object_listing(repo.store).items() if k.startswith("data/"))
    assert data_after < data_before - 0.7 * old.nbytes
    assert read_all(repo.get_snapshot(second.id), "ram0") == new.tobytes()
    report = repo.verify(read_data=True)
    assert report.ok, report.errors
    assert repo.gc().packs_repacked == 0  # nothing left to gain


def test_gc_repack_refuses_damaged_data(repo):
    rng = np.random.default_rng(12)
    old = rng.integers(0, 256, (64, 4096), dtype=np.uint8)
    first = snapshot(repo, old.reshape(-1), "vm1")
    keep = old.copy()
    keep[1:] = rng.integers(0, 256, (63, 4096), dtype=np.uint8)
    snapshot(repo, keep.reshape(-1), "vm1")
    repo.delete_snapshot(first.id)
    index = repo.refresh_index(full=True)
    loc = index.entries[repo.crypto.object_id(old[0].tobytes())]
    pack = index.packs[loc[0]]
    data = bytearray(repo.store.get(pack.key))
    start = int(pack.frames[loc[1]]["offset"]) + loc[2] * 4096
    data[start + 5] ^= 1  # raw frame: random pages do not compress
    repo.store.delete(pack.key)
    repo.store.put(pack.key, bytes(data))
    before = object_listing(repo.store)
    with pytest.raises(RepositoryError, match=f"nothing.*{pack.key}"):
        repo.gc()
    assert {k for k in object_listing(repo.store) if not k.startswith("data/")} == \
        {k for k in before if not k.startswith("data/")}
    assert all(k in object_listing(repo.store) for k in before)  # nothing deleted


def test_gc_removes_what_interrupted_puts_left(tmp_path):
    repo = Repository.init(open_backend(str(tmp_path / "repo")))
    mem = make_memory(64, seed=11)
    info = snapshot(repo, mem, "vm1")
    pack_dir = next((tmp_path / "repo" / "data").iterdir())
    stale = pack_dir / "0123.tmp-0123456789abcdef"  # a writer killed two days ago
    stale.write_bytes(b"partial pack")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    fresh = pack_dir / "4567.tmp-fedcba9876543210"  # a put running right now
    fresh.write_bytes(b"partial pack")
    assert repo.gc().leftovers_removed == 1
    assert not stale.exists() and fresh.exists()
    assert read_all(repo.get_snapshot(info.id), "ram0") == mem.tobytes()
