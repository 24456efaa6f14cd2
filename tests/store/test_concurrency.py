"""Concurrency rule: writers take shared locks and never overwrite (every object name is
unique), so concurrent writers cannot lose each other's data; gc takes the exclusive
lock, so it never deletes data a writer in progress is deduplicating against."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from snapvisor.store import Repository, RepositoryLocked, open_backend
from snapvisor.store.locks import EXCLUSIVE, SHARED

from store_helpers import SMALL_REPO, TEST_PASSWORD, make_memory, read_all


def test_two_writers_interleaved(backend):
    Repository.init(backend, **SMALL_REPO)
    a, b = Repository.open(backend), Repository.open(backend)
    shared = make_memory(64, seed=1)
    mem_a = np.concatenate([shared, make_memory(32, seed=2)])
    mem_b = np.concatenate([shared, make_memory(32, seed=3)])
    wa, wb = a.start_snapshot(), b.start_snapshot()
    wa.put_region("ram0", mem_a.nbytes, mem_a)
    wb.put_region("ram0", mem_b.nbytes, mem_b)  # same shared pages, written twice: harmless
    info_b = wb.commit("vm-b")
    info_a = wa.commit("vm-a")
    fresh = Repository.open(backend)
    assert {s.id for s in fresh.list_snapshots()} == {info_a.id, info_b.id}
    assert read_all(fresh.get_snapshot(info_a.id), "ram0") == mem_a.tobytes()
    assert read_all(fresh.get_snapshot(info_b.id), "ram0") == mem_b.tobytes()
    assert fresh.verify(read_data=True).ok


WRITER = textwrap.dedent("""
    import json, sys, numpy as np
    from snapvisor.store import Repository, open_backend
    repo = Repository.open(open_backend(sys.argv[1]), lock_wait=60)
    seed = int(sys.argv[2])
    common = np.random.default_rng(0).integers(0, 256, 256 * 4096, dtype=np.uint8)
    own = np.random.default_rng(seed).integers(0, 256, 64 * 4096, dtype=np.uint8)
    mem = np.concatenate([common, own])
    ids = []
    for i in range(4):
        mem[i * 4096] ^= 0xFF
        with repo.start_snapshot() as w:
            w.put_region("ram0", mem.nbytes, mem)
            ids.append((w.commit(f"vm{seed}").id, mem.tobytes().hex()[:64]))
    print(json.dumps(ids))
""")


def test_two_writer_processes(tmp_path):
    url = str(tmp_path / "repo")
    Repository.init(open_backend(url), **SMALL_REPO)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, str(seed)],
                              stdout=subprocess.PIPE, text=True) for seed in (1, 2)]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    repo = Repository.open(open_backend(url))
    assert sorted(s.id for s in repo.list_snapshots()) == sorted(i for r in results for i, _ in r)
    for written in results:
        for snapshot_id, head in written:
            assert read_all(repo.get_snapshot(snapshot_id), "ram0")[:32].hex() == head
    assert repo.verify(read_data=True).ok


def test_gc_waits_for_a_writer_in_progress(repo):
    base = make_memory(64, seed=4)
    with repo.start_snapshot() as w:
        w.put_region("ram0", base.nbytes, base)
        old = w.commit("vm1")
    # A writer deduplicates against the old snapshot's pages, then the old snapshot
    # is forgotten before the writer commits: gc must not take those pages away.
    writer = repo.start_snapshot()
    writer.put_region("ram0", base.nbytes, base)
    repo.delete_snapshot(old.id)
    gc_repo = Repository.open(repo.store, password=TEST_PASSWORD, lock_wait=0.3)
    with pytest.raises(RepositoryLocked, match="shared lock for snapshot held by pid"):
        gc_repo.gc()
    new = writer.commit("vm1")
    assert writer.stats["pages_new"] == 0  # everything came from the old snapshot's packs
    gc_repo.gc()
    assert read_all(repo.get_snapshot(new.id), "ram0") == base.tobytes()
    assert repo.verify(read_data=True).ok


def test_gc_started_first_makes_writers_wait(repo):
    done = threading.Event()
    lock = repo.locks.acquire(EXCLUSIVE, "gc")
    with pytest.raises(RepositoryLocked, match="exclusive lock for gc"):
        Repository.open(repo.store, password=TEST_PASSWORD, lock_wait=0.2).start_snapshot()

    def release_soon():
        time.sleep(0.3)
        lock.release()
        done.set()

    threading.Thread(target=release_soon).start()
    with Repository.open(repo.store, password=TEST_PASSWORD, lock_wait=10).start_snapshot() as w:  # waits, then runs
        assert done.is_set()
        w.put_region("ram0", 4096, b"\1" * 4096)
        w.commit("vm1")


def test_stale_locks_are_ignored(backend):
    repo = Repository.init(backend, **SMALL_REPO)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    backend.put("locks/dead-writer", json.dumps({
        "kind": SHARED, "purpose": "snapshot", "host": repo.locks.host, "pid": int(dead),
        "time": time.time()}).encode())
    backend.put("locks/old-gc", json.dumps({
        "kind": EXCLUSIVE, "purpose": "gc", "host": "elsewhere", "pid": 1,
        "time": time.time() - 2 * repo.locks.stale_after}).encode())
    assert repo.locks.holders() == []
    repo.gc()  # neither lock blocks


def test_lock_refresh_keeps_it_alive(backend):
    repo = Repository.init(backend, **SMALL_REPO)
    repo.locks.refresh = 0.05
    lock = repo.locks.acquire(SHARED, "snapshot")
    first = lock.record
    time.sleep(0.3)
    assert lock.record.key != first.key and lock.record.time > first.time
    [live] = repo.locks.holders()
    assert (live.kind, live.purpose, live.pid) == (SHARED, "snapshot", os.getpid())
    assert live.time > first.time
    lock.release()
    assert repo.locks.holders() == []


def test_a_refreshing_lock_never_looks_free(backend):
    # The refresh writes a new object and deletes the old one; a reader listing in
    # between must still see the holder (once or, mid-refresh, twice), or gc could
    # start under a writer.
    repo = Repository.init(backend, **SMALL_REPO)
    repo.locks.refresh = 0.005
    with repo.locks.acquire(SHARED, "snapshot"):
        seen = [len(repo.locks.holders()) for _ in range(100)]
    assert 0 not in seen, seen
