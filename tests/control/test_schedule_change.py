"""A schedule change takes effect at once, also while a scheduled snapshot is under
way: when that snapshot ends it neither re-arms a timer nor prunes by the settings
it started under. The snapshot is held in flight deterministically by a real
exclusive lock on its repository (what `snapvisor gc` holds), and released once the
change is made; one case per kind of change."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pytest

from control_helpers import assert_healthy, wait_until
from snapvisor.control import ApiClient
from snapvisor.store import Repository
from snapvisor.store.locks import EXCLUSIVE
from test_api import running  # noqa: F401 - the fixture

pytestmark = pytest.mark.kvm

OLD = {"every": "1s", "keep": {"last": 1}}  # with repos [A]

# kind -> (the change, given repositories A and B; snapshots of this VM left in A:
# the two taken before plus the one that was in flight, less what retention in
# force when it ended removes). The new interval is long, so no other run follows.
CHANGES = {
    "every": (lambda a, b: {"every": "1h", "repos": [a], "keep": {"last": 1}}, 1),
    "retention": (lambda a, b: {"every": "1h", "repos": [a], "keep": {"last": 5}}, 3),
    "repository added": (lambda a, b: {"every": "1h", "repos": [a, b], "keep": {"last": 1}}, 1),
    "repository removed": (lambda a, b: {"every": "1h", "repos": [b], "keep": {"last": 1}}, 3),
    "disabled": (lambda a, b: {"every": None}, 3),
}


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def snapshot_ids(url: str) -> list[str]:
    with Repository.open_url(url) as repo:
        return [s.id for s in repo.list_snapshots()]


@pytest.mark.parametrize("kind", list(CHANGES))
def test_a_change_while_a_scheduled_snapshot_runs_takes_effect_at_once(running, tmp_path: Path, kind: str) -> None:
    _, out, sock, _ = running
    api = ApiClient(sock, timeout=60)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    before = [api.snapshot(a)["id"], api.snapshot(a)["id"]]
    change, left_in_a = CHANGES[kind]

    with Repository.open_url(a) as repo:
        lock = repo.locks.acquire(EXCLUSIVE, "test: hold the scheduled snapshot", wait=0)
        try:
            api.set_schedule(repos=[a], **OLD)
            wait_until(lambda: api.schedule()["targets"][0]["running_since"], 20, "the scheduled snapshot to start")
            body = change(a, b)
            changed_at = time.time()
            answer = api.request("PUT", "/schedule", body)
        finally:
            lock.release()

    # The snapshot that was under way ends (it waits for the lock no more).
    def in_flight_ended() -> bool:
        last = api.vm()["last_snapshot"]
        return last is not None and last["id"] not in before

    wait_until(in_flight_ended, 30, "the scheduled snapshot that was in flight to end")
    new_targets = {t["repo"]: t for t in answer["targets"]}
    if a in new_targets:
        # It counts in A's history, and its retention ran by the settings in force.
        target = wait_until(lambda: (lambda t: t if t["snapshots"] == 1 and t["running_since"] is None else None)(
            {t["repo"]: t for t in api.schedule()["targets"]}[a]), 20, "the run to be recorded")
        assert target["last_prune"]["kept"] == left_in_a, target
    else:
        # Not scheduled any more: A is left as the change found it, plus that snapshot,
        # and nothing prunes it or snapshots into it again (twice the old interval).
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            assert len(snapshot_ids(a)) == 3
            time.sleep(0.2)
    ids = snapshot_ids(a)
    assert len(ids) == left_in_a, (kind, ids)
    if left_in_a == 3:
        assert ids[:2] == before

    # Every timer is armed from the change: one new interval after it, as the
    # change's answer said; the run that ended did not re-arm its own.
    status = api.schedule()
    assert status["enabled"] == (body["every"] is not None)
    assert [t["repo"] for t in status["targets"]] == list(new_targets)
    for target in status["targets"]:
        assert target["snapshots"] == (1 if target["repo"] == a else 0), target
        assert abs(epoch(target["next_run"]) - epoch(new_targets[target["repo"]]["next_run"])) < 0.1, target
        assert epoch(target["next_run"]) > changed_at + 3600 - 5, target
    assert_healthy(out.getvalue())
