"""Snapshot requests that arrive while a snapshot runs are coalesced: identical ones
(same repository, `full`, tags) share the one snapshot that follows, each caller
gets that snapshot as its answer, saying it was coalesced; different ones get a
follower each. The running snapshot is held deterministically by a real exclusive
lock on its repository (what `snapvisor gc` holds)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from control_helpers import assert_healthy, wait_until
from snapvisor.control import ApiClient
from snapvisor.store import Repository
from snapvisor.store.locks import EXCLUSIVE
from test_api import running  # noqa: F401 - the fixture

pytestmark = pytest.mark.kvm

# Requests sent while the first snapshot is held: (tags, full) -> how many.
FOLLOWERS = {(("a",), False): 6, (("b",), False): 3, (("a",), True): 2}


def test_requests_while_a_snapshot_runs_share_one_follower_each(running, tmp_path: Path) -> None:
    _, out, sock, _ = running
    api = ApiClient(sock, timeout=60)
    url = str(tmp_path / "repo")
    first = api.snapshot(url)
    answers: dict[tuple, list[dict]] = {key: [] for key in FOLLOWERS}
    leader: list[dict] = []

    def ask(tags: tuple[str, ...], full: bool, into: list) -> None:
        into.append(api.snapshot(url, tags=list(tags), full=full))

    with Repository.open_url(url) as repo:
        lock = repo.locks.acquire(EXCLUSIVE, "test: hold the running snapshot", wait=0)
        threads = [threading.Thread(target=ask, args=((), False, leader))]
        try:
            threads[0].start()
            wait_until(lambda: api.vm()["snapshots_in_progress"]["running"], 20, "the first snapshot to start")
            for (tags, full), count in FOLLOWERS.items():
                for _ in range(count):
                    threads.append(threading.Thread(target=ask, args=(tags, full, answers[(tags, full)])))
                    threads[-1].start()

            def all_waiting() -> bool:
                progress = api.vm()["snapshots_in_progress"]
                return sorted(w["requests"] for w in progress["waiting"]) == sorted(FOLLOWERS.values())

            wait_until(all_waiting, 20, "every request to wait behind the first snapshot")
            progress = api.vm()["snapshots_in_progress"]
            assert progress["running"]["repo"] == url and progress["running"]["requests"] == 1
        finally:
            lock.release()
        for thread in threads:
            thread.join(60)
    assert not any(thread.is_alive() for thread in threads)

    [held] = leader
    assert held["coalesced"] is False and held["requests"] == 1 and held["parent"] == first["id"]
    followers = {}
    for (tags, full), count in FOLLOWERS.items():
        got = answers[(tags, full)]
        assert len(got) == count
        # One snapshot answers them all, with its own id, tags and cost.
        assert len({a["id"] for a in got}) == 1, got
        assert all(a["coalesced"] is True and a["requests"] == count for a in got), got
        assert got[0]["tags"] == list(tags) and got[0]["full"] is full and got[0]["pause_s"] >= 0
        followers[got[0]["id"]] = got[0]
    # Exactly one follower per kind of request, each taken after the held one.
    with Repository.open_url(url) as repo:
        listed = {s.id: s for s in repo.list_snapshots()}
    assert set(listed) == {first["id"], held["id"], *followers}
    assert all(listed[i].time >= listed[held["id"]].time for i in followers)
    assert api.vm()["snapshots_in_progress"] == {"running": None, "waiting": []}
    assert_healthy(out.getvalue())

