"""Scheduled snapshots: every `every` seconds into each repository, retention after
each success, and failed attempts retried with exponential back-off.

The scheduler is one thread beside the vCPUs. A failed snapshot (a store outage)
changes nothing in the VM: the Snapshotter keeps the pages dirtied since the last
good snapshot in that repository, so the retry that succeeds carries all of them.
Back-off starts at one second and doubles up to `max(every, 30 s)`: a short
schedule does not hammer a store that is down, a long one retries well before
its next regular run.

A change of schedule takes effect at once, also while a scheduled snapshot is
under way: the change arms every timer from the new settings, and the snapshot
that was running is recorded when it ends but re-arms no timer (each change
starts a new generation, and only a run of the current one re-arms), and it is
pruned by the retention in force then, not by the one it started under.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

from snapvisor.control.controller import VmController, validate_tags
from snapvisor.control.errors import BadRequest, Conflict, shown
from snapvisor.control.repo_url import validate_repo_url
from snapvisor.control.wire import duration_from_json
from snapvisor.humanize import duration
from snapvisor.store import KeepPolicy

FIRST_RETRY_S = 1.0
MIN_BACKOFF_CAP_S = 30.0
MIN_EVERY_S = 0.5
MAX_REPOS = 8
KEEP_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
MAX_KEEP_WITHIN_S = 100 * 366 * 86400


@dataclass(frozen=True)
class Schedule:
    every: float                     # seconds between snapshots
    repos: tuple[str, ...]           # repository URLs, each snapshotted in turn
    keep: KeepPolicy | None = None   # retention after each success; None keeps everything
    tags: tuple[str, ...] = ()       # tags on every scheduled snapshot

    def __post_init__(self) -> None:
        if not isinstance(self.every, (int, float)) or isinstance(self.every, bool) or not \
                MIN_EVERY_S <= self.every <= 366 * 86400:
            raise BadRequest(f"every must be between {MIN_EVERY_S} s and a year, not {shown(self.every)}")
        if not self.repos or len(self.repos) > MAX_REPOS:
            raise BadRequest(f"a schedule needs 1 to {MAX_REPOS} repositories")
        for url in self.repos:
            validate_repo_url(url)
        if len(set(self.repos)) != len(self.repos):
            raise BadRequest("a repository is listed twice in the schedule")
        validate_tags(list(self.tags))
        if self.keep is not None and self.keep.is_empty():
            raise BadRequest("keep would remove every snapshot; give at least one rule (e.g. last=3)")

    @classmethod
    def from_json(cls, body: dict) -> "Schedule":
        """From an API body: {"every": "15m" | seconds, "repos": [...], "keep": {...}, "tags": [...]}."""
        unknown = set(body) - {"every", "repos", "keep", "tags"}
        if unknown:
            raise BadRequest(f"unknown field(s) {sorted(unknown)}; a schedule has every, repos, keep, tags")
        every = duration_from_json("every", body.get("every"))
        repos = body.get("repos")
        if not isinstance(repos, list):
            raise BadRequest("repos must be a list of repository URLs")
        keep = body.get("keep")
        tags = body.get("tags", [])
        return cls(every, tuple(repos), keep_policy_from_json(keep) if keep is not None else None,
                   tuple(validate_tags(tags)))

    def to_json(self) -> dict:
        return {"every_s": self.every, "repos": list(self.repos), "tags": list(self.tags),
                "keep": None if self.keep is None else keep_policy_json(self.keep)}


def keep_policy_from_json(body: object) -> KeepPolicy:
    if not isinstance(body, dict):
        raise BadRequest("keep must be an object such as {\"last\": 3, \"daily\": 7}")
    unknown = set(body) - set(KEEP_RULES) - {"within"}
    if unknown:
        raise BadRequest(f"unknown keep rule(s) {sorted(unknown)}; use {', '.join(KEEP_RULES)}, within")
    counts = {}
    for rule in KEEP_RULES:
        value = body.get(rule, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not -1 <= value <= 1_000_000:
            raise BadRequest(f"keep.{rule} must be a whole number from -1 (no limit) to 1000000")
        counts[rule] = value
    within = body.get("within")
    if within is not None:
        if not isinstance(within, str):
            raise BadRequest("keep.within must be a duration string such as '2d'")
        seconds = duration_from_json("keep.within", within)
        if seconds > MAX_KEEP_WITHIN_S:
            raise BadRequest(f"keep.within must be at most 100 years, not {shown(within)}")
        within = timedelta(seconds=seconds)
    return KeepPolicy(**counts, within=within)


def keep_policy_json(policy: KeepPolicy) -> dict:
    out: dict = {rule: getattr(policy, rule) for rule in KEEP_RULES if getattr(policy, rule)}
    if policy.within is not None:
        out["within"] = f"{policy.within.total_seconds():g}s"
    return out


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, timezone.utc).isoformat()


@dataclass
class TargetStatus:
    """What the schedule did in one repository, for GET /vm and GET /schedule."""

    repo: str
    next_run: float  # time.monotonic(): wall-clock steps neither burst nor stall the schedule
    snapshots: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_success: float | None = None
    last_snapshot: str | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    last_prune: dict | None = None
    last_prune_error: str | None = None
    running_since: float | None = None  # time.time() the snapshot under way started

    def to_json(self) -> dict:
        return {
            "repo": self.repo, "next_run": _iso(time.time() + self.next_run - time.monotonic()),
            "running_since": _iso(self.running_since), "snapshots": self.snapshots,
            "failures": self.failures, "consecutive_failures": self.consecutive_failures,
            "last_success": _iso(self.last_success), "last_snapshot": self.last_snapshot,
            "last_error": self.last_error, "last_error_at": _iso(self.last_error_at),
            "last_prune": self.last_prune, "last_prune_error": self.last_prune_error,
        }


class Scheduler:
    """Runs a Schedule against a VmController on its own thread."""

    def __init__(self, controller: VmController, schedule: Schedule | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.controller = controller
        self._log = log  # told about failures and recoveries, one line each
        self._cond = threading.Condition()
        self._schedule: Schedule | None = None
        self._targets: dict[str, TargetStatus] = {}
        self._generation = 0  # counts set_schedule() calls
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="snapshot-scheduler", daemon=True)
        controller.scheduler = self
        if schedule is not None:
            self.set_schedule(schedule)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def schedule(self) -> Schedule | None:
        return self._schedule

    def set_schedule(self, schedule: Schedule | None) -> None:
        """Replace the schedule (None turns it off); the first run is one interval
        from now, and repositories that stay keep their history."""
        with self._cond:
            self._schedule = schedule
            self._generation += 1
            now = time.monotonic()
            old = self._targets
            self._targets = {}
            if schedule is not None:
                for url in schedule.repos:
                    target = old.get(url) or TargetStatus(url, now)
                    target.next_run = now + schedule.every
                    self._targets[url] = target
            self._cond.notify_all()

    def status(self) -> dict:
        with self._cond:
            schedule = self._schedule
            return {
                "enabled": schedule is not None,
                **(schedule.to_json() if schedule is not None else {}),
                "targets": [t.to_json() for t in self._targets.values()],
            }

    def _next_due(self) -> TargetStatus | None:
        return min(self._targets.values(), key=lambda t: t.next_run, default=None)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    target = self._next_due()
                    delay = None if target is None else target.next_run - time.monotonic()
                    if delay is not None and delay <= 0:
                        break
                    self._cond.wait(delay)
                if not self.controller.machine.vm.running:
                    return
                schedule, generation = self._schedule, self._generation
                target.running_since = time.time()
            assert schedule is not None
            try:
                self._run_one(schedule, generation, target)
            finally:
                with self._cond:
                    target.running_since = None

    def _current(self, generation: int) -> bool:
        """Whether no change of schedule came since `generation` (hold _cond)."""
        return generation == self._generation

    def _run_one(self, schedule: Schedule, generation: int, target: TargetStatus) -> None:
        started = time.monotonic()
        try:
            info = self.controller.snapshot(target.repo, tags=schedule.tags).info
        except Conflict as exc:
            # Paused by the operator or stopped: not a store failure, try at the next run.
            self._record_failure(target, str(exc), generation, started + schedule.every, count=False)
            return
        except Exception as exc:  # noqa: BLE001 - nothing a store does may end the schedule
            backoff = min(FIRST_RETRY_S * 2 ** target.consecutive_failures,
                          max(schedule.every, MIN_BACKOFF_CAP_S))
            self._record_failure(target, _describe(exc), generation, time.monotonic() + backoff, count=True)
            self._tell(f"scheduled snapshot into {target.repo} failed ({target.consecutive_failures} in a row): "
                       f"{target.last_error}; retrying in {duration(backoff)}, no dirty page is lost")
            return
        if target.consecutive_failures:
            self._tell(f"scheduled snapshots into {target.repo} work again after "
                       f"{target.consecutive_failures} failed attempts: snapshot {info.id[:12]}")
        with self._cond:
            target.snapshots += 1
            target.consecutive_failures = 0
            target.last_success = time.time()
            target.last_snapshot = info.id
            if self._current(generation):
                # On time: the next run is one interval after this one started, unless
                # that has passed already (a slow upload), then right after this one.
                target.next_run = max(started + schedule.every, time.monotonic())
            # Retention as the settings in force now say: a change while the snapshot
            # ran may have altered it, or ended the schedule (then nothing is pruned).
            in_force = self._schedule if self._targets.get(target.repo) is target else None
        if in_force is not None and in_force.keep is not None:
            self._prune(target, in_force.keep)

    def _prune(self, target: TargetStatus, keep: KeepPolicy) -> None:
        try:
            result = self.controller.prune(target.repo, keep)
        except Exception as exc:  # noqa: BLE001 - a failed prune is retried after the next snapshot
            with self._cond:
                target.last_prune_error = _describe(exc)
            self._tell(f"pruning {target.repo} failed: {target.last_prune_error}; retried after the next snapshot")
            return
        with self._cond:
            target.last_prune = {"kept": len(result.keep), "removed": len(result.remove),
                                 "removed_ids": [s.id for s in result.remove]}
            target.last_prune_error = None

    def _tell(self, line: str) -> None:
        if self._log is not None:
            try:
                self._log(line)
            except Exception:  # noqa: BLE001 - a closed stderr must not stop the schedule
                pass

    def _record_failure(self, target: TargetStatus, message: str, generation: int, next_run: float,
                        count: bool) -> None:
        with self._cond:
            target.last_error = message
            target.last_error_at = time.time()
            if count:
                target.failures += 1
                target.consecutive_failures += 1
            if self._current(generation):
                target.next_run = next_run


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, Exception) and type(exc).__module__.startswith("snapvisor") \
        else f"{type(exc).__name__}: {text}"
