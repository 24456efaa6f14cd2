"""Locks of crashed processes: writers killed with SIGKILL leave their lock objects;
the next gc (or writer) removes them, `snapvisor unlock` removes them on request,
and live locks stay unless `--all` is given. Stale means: the holder's process on
this host is gone (or its pid is another process now), or the lock was not
refreshed within its lifetime."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time

import pytest

from snapvisor.store import Repository
from snapvisor.store import format as fmt
from snapvisor.store.locks import EXCLUSIVE, SHARED, process_start

from store_helpers import SMALL_REPO

WRITERS = 4
# A snapshot writer that takes its (shared) lock, says so, and waits to be killed.
WRITER = """
import sys, time
from snapvisor.store import Repository
writer = Repository.open_url(sys.argv[1]).start_snapshot()
writer.put_region("ram0", 4096, b"\\1" * 4096)
print("LOCKED", flush=True)
time.sleep(600)
"""


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def repo_url(request, tmp_path, monkeypatch):
    if request.param == "local":
        url = str(tmp_path / "repo")
    else:
        endpoint, key, secret = request.getfixturevalue("s3_server")
        for name, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", key),
                            ("AWS_SECRET_ACCESS_KEY", secret), ("AWS_DEFAULT_REGION", "us-east-1")):
            monkeypatch.setenv(name, value)  # for this process and the writers it starts
        url = f"s3://{request.getfixturevalue('s3_bucket')}/{secrets.token_hex(6)}"
    Repository.open_url(url, create=True, **SMALL_REPO).close()
    return url


def _writers(url: str, count: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url], stdout=subprocess.PIPE, text=True)
             for _ in range(count)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "LOCKED"
    return procs


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _lock_keys(url: str) -> set[str]:
    return {info.key for info in Repository.open_url(url).store.list(fmt.LOCK_PREFIX)}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snapvisor", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_gc_removes_the_locks_of_killed_writers(repo_url: str) -> None:
    _kill(_writers(repo_url, WRITERS))
    assert len(_lock_keys(repo_url)) == WRITERS  # what SIGKILL leaves
    assert Repository.open_url(repo_url).locks.holders() == []  # stale: ignored...
    done = _cli("gc", "--repo", repo_url)
    assert done.returncode == 0, done.stderr
    assert _lock_keys(repo_url) == set()  # ...and gone after gc


def test_a_writer_removes_stale_locks_too(repo_url: str) -> None:
    _kill(_writers(repo_url, 2))
    with Repository.open_url(repo_url).start_snapshot() as writer:
        [own] = _lock_keys(repo_url)  # the killed writers' are gone
        assert Repository.open_url(repo_url).locks.holders()[0].key == own
        writer.put_region("ram0", 4096, b"\2" * 4096)
        writer.commit("vm1")
    assert _lock_keys(repo_url) == set()


def test_unlock_removes_stale_locks_and_keeps_live_ones(repo_url: str) -> None:
    procs = _writers(repo_url, 3)
    try:
        _kill(procs[:2])
        repo = Repository.open_url(repo_url)
        # Not refreshed within the lifetime (another host: its pid cannot be asked).
        repo.store.put(fmt.LOCK_PREFIX + "0" * 32, json.dumps({
            "kind": EXCLUSIVE, "purpose": "gc", "host": "elsewhere", "pid": 7,
            "time": time.time() - repo.locks.stale_after - 60}).encode())
        # This test's own pid, but a process that started at another time: the pid was reused.
        repo.store.put(fmt.LOCK_PREFIX + "1" * 32, json.dumps({
            "kind": SHARED, "purpose": "snapshot", "host": repo.locks.host, "pid": os.getpid(),
            "started": process_start(os.getpid()) + 1, "time": time.time()}).encode())
        # Recent, on another host: cannot be judged stale, so it stays.
        elsewhere = fmt.LOCK_PREFIX + "2" * 32
        repo.store.put(elsewhere, json.dumps({
            "kind": SHARED, "purpose": "snapshot", "host": "elsewhere", "pid": 7, "time": time.time()}).encode())
        live = _lock_keys(repo_url) - {fmt.LOCK_PREFIX + "0" * 32, fmt.LOCK_PREFIX + "1" * 32, elsewhere}
        assert len(live) == 3

        done = _cli("unlock", "--repo", repo_url)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("its process is gone") == 3, done.stdout  # two killed, one reused pid
        assert "not refreshed for" in done.stdout and "lock lifetime of 1800s" in done.stdout, done.stdout
        assert "4 lock(s) removed" in done.stdout, done.stdout
        [alive] = [key for key in live if key not in done.stdout]
        assert _lock_keys(repo_url) == {alive, elsewhere}

        done = _cli("unlock", "--all", "--repo", repo_url)
        assert done.returncode == 0 and "warning: removing every lock, live ones included" in done.stderr
        assert f"pid {procs[2].pid}" in done.stdout and "2 lock(s) removed" in done.stdout, done.stdout
        assert _lock_keys(repo_url) == set()
    finally:
        _kill(procs[2:])
