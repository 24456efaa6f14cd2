"""Repository locks: many shared holders (snapshot writers, verify) or one exclusive (gc).

A lock is an object locks/<random> holding who took it and when. Taking one: write
it, then list locks/; if a conflicting live lock is there, remove ours and back
off. With read-after-write consistent listing (local disks, S3 since 2020) two
racing takers cannot both miss each other: whichever lists second sees the other.
Holders rewrite their lock every `refresh` seconds. A lock is stale when it was not
refreshed for `stale_after` seconds (its lifetime), when its process on this host is
gone (or is another process under a reused pid), or when it does not decode: takers
ignore stale locks and delete them, and `snapvisor unlock` deletes them on request.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from snapvisor.store.backend import ObjectStore
from snapvisor.store.crypto import NoEncryption
from snapvisor.store.errors import ObjectNotFound, RepositoryLocked, StoreError
from snapvisor.store.format import LOCK_PREFIX

SHARED = "shared"
EXCLUSIVE = "exclusive"
# Listings of locks/ while holders refresh; each refresh can hide a holder from
# one pass only, and refreshes are minutes apart.
HOLDER_PASSES = 5


@dataclass
class LockRecord:
    key: str
    kind: str
    purpose: str
    host: str
    pid: int
    time: float
    started: int | None = None  # the process's start time (/proc/PID/stat), to tell a reused pid

    def describe(self) -> str:
        age = time.time() - self.time
        return (f"{self.kind} lock for {self.purpose} held by pid {self.pid} on {self.host} "
                f"(refreshed {age:.0f}s ago, object {self.key})")


@dataclass
class StaleLock:
    key: str
    why: str  # "<what the lock says>: <why it is stale>"


def process_start(pid: int) -> int | None:
    """When process `pid` of this host started (clock ticks since boot), or None if
    there is no such process (or no /proc to ask)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return int(fields[19])  # field 22 of stat(5); 20 after the command name
    except (OSError, IndexError, ValueError):
        return None


class RepositoryLock:
    def __init__(self, manager: "LockManager", record: LockRecord):
        self._manager = manager
        self.record = record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh_loop, daemon=True,
                                        name=f"snapvisor-lock-{record.purpose}")
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self._manager.refresh):
            try:
                self.record = self._manager._rewrite(self.record)
            except StoreError:
                pass  # try again next period; the lock goes stale only after stale_after

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self._manager.store.delete(self.record.key)

    def __enter__(self) -> "RepositoryLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_context(key: str) -> str:
    return f"lock {key}"


LOCK_LIFETIME_S = 1800.0  # a lock not refreshed for this long is stale
LOCK_REFRESH_S = 300.0


class LockManager:
    def __init__(self, store: ObjectStore, stale_after: float = LOCK_LIFETIME_S, refresh: float = LOCK_REFRESH_S,
                 crypto: NoEncryption = NoEncryption()):
        self.store = store
        self.crypto = crypto  # lock contents are sealed in encrypted repositories
        self.stale_after = stale_after
        self.refresh = refresh
        self.host = socket.gethostname()
        self._started = process_start(os.getpid())

    def _write(self, kind: str, purpose: str) -> LockRecord:
        record = LockRecord(LOCK_PREFIX + secrets.token_hex(16), kind, purpose, self.host,
                            os.getpid(), time.time(), self._started)
        body = json.dumps({"kind": record.kind, "purpose": purpose, "host": record.host,
                           "pid": record.pid, "time": record.time, "started": record.started}).encode()
        self.store.put(record.key, self.crypto.seal(body, _lock_context(record.key)))
        return record

    def _rewrite(self, record: LockRecord) -> LockRecord:
        fresh = self._write(record.kind, record.purpose)
        self.store.delete(record.key)
        return fresh

    def holders(self) -> list[LockRecord]:
        """Live locks; stale and malformed lock objects are skipped."""
        return self.scan()[0]

    def scan(self) -> tuple[list[LockRecord], list[StaleLock]]:
        """(live locks, stale ones).

        A holder refreshes by writing a new object and then deleting the old one, so
        a lock listed here may be gone when read. Its replacement then already
        exists, and listing again finds it: a refresh never hides a holder.
        """
        for _ in range(HOLDER_PASSES):
            live, stale, vanished = self._read_locks()
            if not vanished:
                break
        return live, stale

    def _read_locks(self) -> tuple[list[LockRecord], list[StaleLock], bool]:
        live: list[LockRecord] = []
        stale: list[StaleLock] = []
        vanished = False
        for info in self.store.list(LOCK_PREFIX):
            try:
                obj = json.loads(self.crypto.unseal(self.store.get(info.key), _lock_context(info.key)))
                started = obj.get("started")
                rec = LockRecord(info.key, str(obj["kind"]), str(obj["purpose"]), str(obj["host"]),
                                 int(obj["pid"]), float(obj["time"]), None if started is None else int(started))
            except ObjectNotFound:
                vanished = True
                continue
            except (ValueError, KeyError, TypeError, AttributeError):
                stale.append(StaleLock(info.key, f"lock object {info.key}: damaged (not a lock record)"))
                continue
            why = self._stale_because(rec)
            if why is None:
                live.append(rec)
            else:
                stale.append(StaleLock(rec.key, f"{rec.describe()}: {why}"))
        return live, stale, vanished

    def _stale_because(self, rec: LockRecord) -> str | None:
        age = time.time() - rec.time
        if age > self.stale_after:
            return f"not refreshed for {age:.0f}s, longer than the lock lifetime of {self.stale_after:.0f}s"
        if rec.host == self.host:
            # Our own locks without a read of /proc: a listing races the refreshes.
            started = self._started if rec.pid == os.getpid() else process_start(rec.pid)
            if started is None:
                try:
                    os.kill(rec.pid, 0)
                except ProcessLookupError:
                    return "its process is gone"
                except PermissionError:
                    pass
            elif rec.started is not None and started != rec.started:
                return "its process is gone (the pid is now another process's)"
        return None

    def remove_stale(self) -> list[StaleLock]:
        """Delete the stale locks; returns them."""
        _, stale = self.scan()
        for lock in stale:
            self.store.delete(lock.key)
        return stale

    def remove_all(self) -> list[StaleLock]:
        """Delete every lock, live ones too (their holders are then unprotected)."""
        live, stale = self.scan()
        for lock in live:
            self.store.delete(lock.key)
        for lock in stale:
            self.store.delete(lock.key)
        return [StaleLock(rec.key, rec.describe()) for rec in live] + stale

    def acquire(self, kind: str, purpose: str, wait: float = 0.0) -> RepositoryLock:
        deadline = time.monotonic() + wait
        delay = 0.05
        while True:
            record = self._write(kind, purpose)
            live, stale = self.scan()
            for lock in stale:  # a crashed holder's: nobody else will
                self.store.delete(lock.key)
            conflicts = [h for h in live if h.key != record.key and
                         (kind == EXCLUSIVE or h.kind == EXCLUSIVE)]
            if not conflicts:
                return RepositoryLock(self, record)
            self.store.delete(record.key)
            if time.monotonic() >= deadline:
                raise RepositoryLocked(
                    f"cannot take a {kind} lock for {purpose} on {self.store.url}: "
                    f"{conflicts[0].describe()}; wait for it to finish and retry (a lock of a "
                    f"crashed process expires after {self.stale_after:.0f}s; one of a process on "
                    f"this host expires when it ends; `snapvisor unlock --all` removes it now, "
                    f"if you are sure that no snapvisor uses the repository)")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
