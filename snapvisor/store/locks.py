"""Repository locks: many shared holders (snapshot writers, verify) or one exclusive (gc).

A lock is an object locks/<random> holding who took it and when. Taking one: write
it, then list locks/; if a conflicting live lock is there, remove ours and back
off. With read-after-write consistent listing (local disks, S3 since 2020) two
racing takers cannot both miss each other: whichever lists second sees the other.
Holders rewrite their lock every `refresh` seconds; a lock not refreshed for
`stale_after` seconds, or one whose process on this host is gone, is ignored.
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

    def describe(self) -> str:
        age = time.time() - self.time
        return (f"{self.kind} lock for {self.purpose} held by pid {self.pid} on {self.host} "
                f"(refreshed {age:.0f}s ago, object {self.key})")


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


class LockManager:
    def __init__(self, store: ObjectStore, stale_after: float = 1800.0, refresh: float = 300.0):
        self.store = store
        self.stale_after = stale_after
        self.refresh = refresh
        self.host = socket.gethostname()

    def _write(self, kind: str, purpose: str) -> LockRecord:
        record = LockRecord(LOCK_PREFIX + secrets.token_hex(16), kind, purpose, self.host,
                            os.getpid(), time.time())
        body = json.dumps({"kind": record.kind, "purpose": purpose, "host": record.host,
                           "pid": record.pid, "time": record.time}).encode()
        self.store.put(record.key, body)
        return record

    def _rewrite(self, record: LockRecord) -> LockRecord:
        fresh = self._write(record.kind, record.purpose)
        self.store.delete(record.key)
        return fresh

    def holders(self) -> list[LockRecord]:
        """Live locks; stale and malformed lock objects are skipped.

        A holder refreshes by writing a new object and then deleting the old one, so
        a lock listed here may be gone when read. Its replacement then already
        exists, and listing again finds it: a refresh never hides a holder.
        """
        for _ in range(HOLDER_PASSES):
            found, vanished = self._read_holders()
            if not vanished:
                break
        return found

    def _read_holders(self) -> tuple[list[LockRecord], bool]:
        found, vanished = [], False
        for info in self.store.list(LOCK_PREFIX):
            try:
                obj = json.loads(self.store.get(info.key))
                rec = LockRecord(info.key, str(obj["kind"]), str(obj["purpose"]), str(obj["host"]),
                                 int(obj["pid"]), float(obj["time"]))
            except ObjectNotFound:
                vanished = True
                continue
            except (ValueError, KeyError, TypeError):
                continue
            if not self._is_stale(rec):
                found.append(rec)
        return found, vanished

    def _is_stale(self, rec: LockRecord) -> bool:
        if time.time() - rec.time > self.stale_after:
            return True
        if rec.host == self.host:
            try:
                os.kill(rec.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def acquire(self, kind: str, purpose: str, wait: float = 0.0) -> RepositoryLock:
        deadline = time.monotonic() + wait
        delay = 0.05
        while True:
            record = self._write(kind, purpose)
            conflicts = [h for h in self.holders() if h.key != record.key and
                         (kind == EXCLUSIVE or h.kind == EXCLUSIVE)]
            if not conflicts:
                return RepositoryLock(self, record)
            self.store.delete(record.key)
            if time.monotonic() >= deadline:
                raise RepositoryLocked(
                    f"cannot take a {kind} lock for {purpose} on {self.store.url}: "
                    f"{conflicts[0].describe()}; wait for it to finish and retry (a lock of a "
                    f"crashed process expires after {self.stale_after:.0f}s)")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
