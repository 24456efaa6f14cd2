"""VmController: every operation an operator may ask of a running VM, validated and
serialised, whoever asks (the API server, the scheduler, Python code).

One lock orders snapshots, pause/resume and migrations, so an operator's pause
never interleaves with the short pause a snapshot takes, two snapshots never share
the Snapshotter's dirty-page bookkeeping, and nothing pauses or snapshots a VM
while it migrates.

Snapshot requests that wait for that lock are coalesced: identical requests (same
repository, `full`, tags) that arrive while a snapshot runs share the one snapshot
that follows it. However fast requests come, each is answered by a snapshot taken
after it arrived, at most one snapshot per kind of request waits, and the snapshots
taken keep pace with what the store can write.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from snapvisor.control.errors import BadRequest, Conflict, ControlError, OperationFailed, shown
from snapvisor.errors import SnapvisorError
from snapvisor.store import KeepPolicy, PruneResult, Repository, SnapshotInfo
from snapvisor.store.manifest import check_name

if TYPE_CHECKING:
    from snapvisor.control.schedule import Scheduler
    from snapvisor.image.capture import CaptureStats
    from snapvisor.machine import VM
    from snapvisor.migrate import MigrationStats
    from snapvisor.migrate.tls import Protection
    from snapvisor.store.password import PasswordSource
    from snapvisor.vmm.exit_status import ExitStatus

MAX_TAGS = 16
_HOST = re.compile(r"[A-Za-z0-9._%:-]{1,255}")  # a host name, IPv4, or IPv6 (with a %scope)


def validate_tags(tags: object) -> list[str]:
    if not isinstance(tags, list) or len(tags) > MAX_TAGS:
        raise BadRequest(f"tags must be a list of at most {MAX_TAGS} strings")
    for tag in tags:
        try:
            check_name("tag", tag)
        except SnapvisorError as exc:
            raise BadRequest(str(exc)) from None
    return list(tags)


def validate_address(to: object) -> str:
    """A migration destination: HOST:PORT or [IPv6]:PORT, port 1 to 65535."""
    text = to if isinstance(to, str) else ""
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not (_HOST.fullmatch(host) and port.isdigit() and 1 <= int(port) <= 65535):
        raise BadRequest(f"to must be the receiver's HOST:PORT (192.0.2.20:7000, [2001:db8::2]:7000), "
                         f"port 1 to 65535, not {shown(to)}")
    return text


def validate_server_name(name: object) -> str:
    """The name the receiver's TLS certificate must have: a host name or IP address."""
    if not (isinstance(name, str) and _HOST.fullmatch(name)):
        raise BadRequest(f"tls_server_name must be the host name or IP address in the receiver's certificate, "
                         f"not {shown(name)}")
    return name


# The regions of a snapshot that hold a disk (image/disks.py REGION_PREFIX; importing
# it would load the VMM into `snapvisor ls`).
DISK_REGION_PREFIX = "disk-"


def snapshot_json(info: SnapshotInfo) -> dict:
    """`memory_bytes` counts guest RAM only, as GET /vm does; `disk_bytes` the disks."""
    return {
        "id": info.id,
        "time": info.time.isoformat(),
        "vm": info.vm,
        "tags": list(info.tags),
        "parent": info.parent,
        "kind": info.meta.get("kind"),
        "memory_bytes": sum(size for name, size in info.regions.items() if not name.startswith(DISK_REGION_PREFIX)),
        "disk_bytes": sum(size for name, size in info.regions.items() if name.startswith(DISK_REGION_PREFIX)),
    }


@dataclass(frozen=True)
class SnapshotTaken:
    """A snapshot and what it cost; `requests` counts the requests it answered
    (more than one: coalesced, module docstring)."""

    info: SnapshotInfo
    cost: "CaptureStats | None"
    requests: int = 1

    def to_json(self) -> dict:
        answer = snapshot_json(self.info)
        if self.cost is not None:
            answer.update(full=self.cost.full, pause_s=round(self.cost.pause_s, 4),
                          total_s=round(self.cost.total_s, 3), store=self.cost.store)
        answer.update(coalesced=self.requests > 1, requests=self.requests)
        return answer


class _SharedSnapshot:
    """A snapshot asked for by one or more identical requests: the first takes it,
    the others wait here for its outcome."""

    def __init__(self, repo: str, since: float) -> None:
        self.repo = repo
        self.since = since
        self.requests = 0
        self._done = threading.Event()
        self._taken: SnapshotTaken | None = None
        self._error: ControlError | None = None

    def succeed(self, taken: SnapshotTaken) -> None:
        self._taken = taken
        self._done.set()

    def fail(self, error: ControlError) -> None:
        self._error = error
        self._done.set()

    def result(self) -> SnapshotTaken:
        self._done.wait()
        if self._error is not None:
            raise type(self._error)(str(self._error), self._error.status)
        assert self._taken is not None
        return self._taken

    def to_json(self) -> dict:
        return {"repo": self.repo, "since": datetime.fromtimestamp(self.since, timezone.utc).isoformat(),
                "requests": self.requests}


class VmController:
    """Operations on one running `snapvisor.machine.VM`."""

    def __init__(self, machine: "VM", protection: "Protection | None" = None,
                 password: "PasswordSource | None" = None) -> None:
        self.machine = machine
        # How this VM's migrations are protected: the process's --tls-* flags, never a request's.
        self.protection = protection
        self._password = password  # of encrypted repositories; never in a request
        self.scheduler: "Scheduler | None" = None
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._paused_by_operator = False
        # Held for a migration's whole length, beside _lock: a second migration is
        # refused at once, and the VMM's exit (stop) waits for the one under way.
        self._migration = threading.Lock()
        self._migrating_to: str | None = None
        # A migration's handover went out and was not confirmed: the target may run
        # the guest, so it stays paused here until the operator resumes it by force.
        self._unconfirmed_to: str | None = None
        self._repositories: dict[str, Repository] = {}
        self._repositories_lock = threading.Lock()
        # Snapshot requests by (repository, full, tags): the one running, those waiting.
        self._snapshots_lock = threading.Lock()
        self._running: _SharedSnapshot | None = None
        self._shared: dict[tuple[str, bool, tuple[str, ...]], _SharedSnapshot] = {}

    # -- state -------------------------------------------------------------------------

    @property
    def state(self) -> str:
        vm = self.machine.vm
        if not vm.running:
            return "Stopped"
        if self._unconfirmed_to is not None:
            return "HandoverUnconfirmed"
        if self._paused_by_operator:
            return "Paused"
        return "Migrating" if self._migrating_to is not None else "Running"

    def info(self) -> dict:
        vm = self.machine.vm
        last = self.machine.last_snapshot
        return {
            "name": self.machine.name,
            "state": self.state,
            "vcpus": len(vm.vcpus),
            "memory_bytes": sum(region.size for region in vm.memory.regions),
            "uptime_s": round(time.time() - self.started_at, 3),
            "last_snapshot": None if last is None else {
                "id": last.snapshot_id, "full": last.full, "pause_s": round(last.pause_s, 4),
                "total_s": round(last.total_s, 3), "store": last.store,
            },
            "schedule": None if self.scheduler is None else self.scheduler.status(),
            "snapshots_in_progress": self.snapshots_in_progress(),
        }

    def set_state(self, state: str, force: bool = False) -> None:
        """'Paused' or 'Resumed' (Firecracker's names); repeating one is a no-op.
        After an unconfirmed handover only a forced 'Resumed' runs the guest here."""
        if state not in ("Paused", "Resumed"):
            raise BadRequest(f"state {shown(state)} is not one of 'Paused', 'Resumed'")
        self.refuse_while_migrating()
        with self._lock:
            self._require_running()
            if state == "Paused":
                self.machine.pause()
                self._paused_by_operator = True
            else:
                if not force:
                    self._refuse_while_unconfirmed()
                self.machine.resume()
                self._paused_by_operator = False
                self._unconfirmed_to = None

    def shutdown(self) -> None:
        """Stop the VM; `snapvisor run` then exits."""
        with self._lock:
            self._paused_by_operator = False
            self.machine.stop()

    def stop(self) -> "ExitStatus":
        """Stop the VM because the VMM exits (Ctrl-C, SIGTERM). A migration under way
        ends first: cut in its handover, the guest could run on both hosts or on
        neither. The status says 'migrated' when it went through."""
        with self._migration:
            return self.machine.stop()

    def _require_running(self) -> None:
        if not self.machine.vm.running:
            raise Conflict(f"VM {self.machine.name} has stopped")

    def _refuse_while_unconfirmed(self) -> None:
        to = self._unconfirmed_to
        if to is not None:
            raise Conflict(f"VM {self.machine.name} is paused after a handover to {to} that was not confirmed: "
                           f"the target may be running it; check it there, and only if it does not run there, "
                           f"resume it here with --force (`snapvisor resume --force --api-sock PATH`, or PUT "
                           f"/vm/state {{\"state\": \"Resumed\", \"force\": true}})")

    def refuse_while_migrating(self) -> None:
        """A request that would otherwise wait on the lock for the whole migration
        is refused at once instead."""
        to = self._migrating_to
        if to is not None:
            raise Conflict(f"VM {self.machine.name} is migrating to {to}; try again when that has ended")

    # -- snapshots -----------------------------------------------------------------------

    def repository(self, url: str) -> Repository:
        """One open Repository per URL for the VM's lifetime (its index stays cached);
        created on first use."""
        with self._repositories_lock:
            repo = self._repositories.get(url)
            if repo is None:
                try:
                    repo = Repository.open_url(url, create=True, password=self._password)
                except SnapvisorError as exc:
                    raise OperationFailed(f"cannot open repository {url}: {exc}") from None
                self._repositories[url] = repo
            return repo

    def check_repository(self, url: str) -> None:
        """Refuse (400) a repository that does not open, creating it if it is new:
        a schedule is accepted only when its repositories can take snapshots."""
        try:
            self.repository(url)
        except OperationFailed as exc:
            raise BadRequest(f"{exc}; the schedule was not changed") from None

    def snapshot(self, url: str, *, full: bool = False, tags: list[str] | tuple[str, ...] = ()) -> SnapshotTaken:
        """Take a snapshot into `url` while the guest runs (it pauses only to copy
        what changed), or share the one an identical request waits for (module
        docstring). A failure loses nothing: the next snapshot there carries
        every page dirtied since the last one that succeeded."""
        self.refuse_while_migrating()
        key = (url, full, tuple(tags))
        with self._snapshots_lock:
            shared = self._shared.get(key)
            leads = shared is None
            if leads:
                shared = self._shared[key] = _SharedSnapshot(url, time.time())
            shared.requests += 1
        if not leads:
            return shared.result()
        try:
            with self._lock:
                with self._snapshots_lock:
                    # Started: requests from now on wait for the snapshot after this one.
                    del self._shared[key]
                    self._running = shared
                try:
                    taken = self._snapshot_now(url, full, tags, shared.requests)
                finally:
                    with self._snapshots_lock:
                        self._running = None
        except ControlError as exc:
            shared.fail(exc)
            raise
        except BaseException as exc:  # a bug: the requests sharing it must not wait for ever
            shared.fail(OperationFailed(f"snapshot into {url} failed: internal error: {type(exc).__name__}: {exc}"))
            raise
        shared.succeed(taken)
        return taken

    def _snapshot_now(self, url: str, full: bool, tags: list[str] | tuple[str, ...], requests: int) -> SnapshotTaken:
        self._require_running()
        self._refuse_while_unconfirmed()
        if self._paused_by_operator:
            raise Conflict(f"VM {self.machine.name} is paused by the operator; resume it "
                           f"(PUT /vm/state {{\"state\": \"Resumed\"}}) before a snapshot")
        repo = self.repository(url)
        try:
            info = self.machine.snapshot(repo, tags=list(tags), full=full)
        except SnapvisorError as exc:
            raise OperationFailed(f"snapshot into {url} failed: {exc}") from None
        return SnapshotTaken(info, self.machine.last_snapshot, requests)

    def snapshots_in_progress(self) -> dict:
        """The snapshot being taken and those waiting for it, for GET /vm."""
        with self._snapshots_lock:
            return {"running": None if self._running is None else self._running.to_json(),
                    "waiting": [w.to_json() for w in self._shared.values()]}

    # -- migration -------------------------------------------------------------------

    def migrate(self, to: str, *, downtime_ms: float, max_time_s: float, io_timeout_s: float,
                auto_converge: bool = True, repo: str | None = None,
                tls_server_name: str | None = None) -> "MigrationStats":
        """Move the running VM to `snapvisor receive` at `to` (snapvisor.migrate.migrate).
        On success it has stopped here with status 'migrated'; on failure OperationFailed
        says why, and the VM runs on here, or stays paused in HandoverUnconfirmed."""
        from snapvisor.migrate import HandoverUnconfirmed, Protection, migrate

        if not self._migration.acquire(blocking=False):
            raise Conflict(f"VM {self.machine.name} is already migrating to {self._migrating_to}")
        # Set before waiting for the lock (a snapshot may hold it): pauses and
        # snapshots asked for meanwhile are refused rather than queued before it.
        self._migrating_to = to
        try:
            with self._lock:
                self._require_running()
                self._refuse_while_unconfirmed()
                if self._paused_by_operator:
                    raise Conflict(f"VM {self.machine.name} is paused by the operator; resume it "
                                   f"(PUT /vm/state {{\"state\": \"Resumed\"}}) before migrating it")
                try:
                    # Opened with the password this VMM was started with (never in a request).
                    base = Repository.open_url(repo, password=self._password) if repo is not None else None
                    return migrate(self.machine, to, repo=base, downtime_ms=downtime_ms, max_time_s=max_time_s,
                                   auto_converge=auto_converge, io_timeout_s=io_timeout_s,
                                   protection=self.protection or Protection(), server_name=tls_server_name)
                except HandoverUnconfirmed as exc:
                    # The guest may run at `to`: paused here until the operator resumes
                    # it by force; no snapshot (which resumes what it paused) runs it.
                    self._unconfirmed_to = to
                    raise OperationFailed(str(exc)) from None
                except SnapvisorError as exc:  # MigrationError, saying the VM runs on here
                    raise OperationFailed(str(exc)) from None
        finally:
            self._migrating_to = None
            self._migration.release()

    def prune(self, url: str, policy: KeepPolicy) -> PruneResult:
        """Apply `policy` to this VM's snapshots in `url` (other VMs' are untouched)."""
        repo = self.repository(url)
        try:
            return repo.prune(policy, vm=self.machine.name)
        except SnapvisorError as exc:
            raise OperationFailed(f"pruning {url} failed: {exc}") from None

    def close(self) -> None:
        with self._repositories_lock:
            for repo in self._repositories.values():
                repo.close()
            self._repositories.clear()
