"""A writer killed at any point leaves every earlier snapshot restorable and no
manifest pointing at missing data."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from snapvisor.store import ObjectStore, Repository, open_backend
from snapvisor.store.memory import MemoryStore

from store_helpers import SMALL_REPO, make_memory, read_all


class Crash(Exception):
    """Stands in for the process dying at this point."""


class CrashingStore(ObjectStore):
    """Delegates to `inner` until the n-th put, which 'kills the process'."""

    def __init__(self, inner: ObjectStore, crash_at_put: int):
        self.inner, self.url = inner, inner.url
        self.crash_at_put = crash_at_put
        self.puts = 0

    def put(self, key, data):
        if not key.startswith("locks/"):
            self.puts += 1
            if self.puts == self.crash_at_put:
                raise Crash(key)
        return self.inner.put(key, data)

    def get(self, key, offset=0, length=None):
        return self.inner.get(key, offset, length)

    def head(self, key):
        return self.inner.head(key)

    def list(self, prefix):
        return self.inner.list(prefix)

    def delete(self, key):
        self.inner.delete(key)


def test_crash_at_every_put_of_a_snapshot():
    base_mem = make_memory(128, seed=1)
    changed = np.arange(10, 60)
    new_mem = base_mem.copy().reshape(-1, 4096)
    new_mem[changed] = np.random.default_rng(5).integers(0, 256, (len(changed), 4096), np.uint8)

    def write_second(repo, parent):
        with repo.start_snapshot(parent) as w:
            w.put_region("ram0", base_mem.nbytes, new_mem[changed].tobytes(), changed)
            w.put_blob("state", b"s2")
            return w.commit("vm1")

    crash_at = 1
    while True:
        inner = MemoryStore(f"memory://crash-{crash_at}")
        repo = Repository.init(inner, **SMALL_REPO)
        with repo.start_snapshot() as w:
            w.put_region("ram0", base_mem.nbytes, base_mem)
            first = w.commit("vm1")
        crashing = Repository.open(CrashingStore(inner, crash_at))
        try:
            second = write_second(crashing, first.id)
        except Crash:
            second = None
        survivor = Repository.open(inner)
        ids = [s.id for s in survivor.list_snapshots()]
        assert read_all(survivor.get_snapshot(first.id), "ram0") == base_mem.tobytes()
        assert survivor.verify(read_data=True).ok
        if second is None:
            assert ids == [first.id]
            # The repository stays writable and gc removes what the crash left behind.
            survivor.gc()
            assert survivor.verify(read_data=True).ok
            crash_at += 1
            continue
        assert read_all(survivor.get_snapshot(second.id), "ram0") == new_mem.tobytes()
        break
    assert crash_at > 3  # packs, index and manifest were each interrupted


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from snapvisor.store import Repository, open_backend
    repo = Repository.open(open_backend(sys.argv[1]))
    rng = np.random.default_rng(int(sys.argv[2]))
    mem = rng.integers(0, 256, 2048 * 4096, dtype=np.uint8)
    mem[: 1024 * 4096] = 0
    print("ready", flush=True)
    while True:
        mem[rng.integers(0, len(mem) - 4096, 64)] ^= 1
        with repo.start_snapshot() as w:
            w.put_region("ram0", mem.nbytes, mem)
            w.commit("vm-kill")
""")


def test_sigkill_during_snapshots(tmp_path):
    url = str(tmp_path / "repo")
    Repository.init(open_backend(url), **SMALL_REPO)
    for round_no in range(2):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, url, str(round_no)],
                                stdout=subprocess.PIPE, env=dict(os.environ))
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.4 + 0.3 * round_no)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    repo = Repository.open(open_backend(url), lock_wait=0)
    snapshots = repo.list_snapshots()
    assert snapshots, "the writer never committed; raise the sleep"
    report = repo.verify(read_data=True)
    assert report.ok, report.errors
    for snap in snapshots:
        assert len(read_all(repo.get_snapshot(snap.id), "ram0")) == 2048 * 4096
    # Locks of the killed writers are ignored (dead pid on this host), so gc runs.
    repo.gc()
    assert repo.verify(read_data=True).ok

