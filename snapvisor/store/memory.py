"""In-process object store for fast unit tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from snapvisor.store.backend import ObjectInfo, ObjectStore, check_key, check_range
from snapvisor.store.errors import ObjectNotFound


class MemoryStore(ObjectStore):
    _named: dict[str, "MemoryStore"] = {}
    _named_lock = threading.Lock()

    def __init__(self, url: str = "memory://"):
        self.url = url
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    @classmethod
    def named(cls, url: str) -> "MemoryStore":
        """The store registered under `url`; every open of the same URL shares it."""
        with cls._named_lock:
            store = cls._named.get(url)
            if store is None:
                store = cls._named[url] = cls(url)
            return store

    @classmethod
    def forget(cls, url: str) -> None:
        with cls._named_lock:
            cls._named.pop(url, None)

    def put(self, key: str, data) -> bool:
        check_key(key)
        blob = bytes(data)
        with self._lock:
            if key in self._objects:
                return False
            self._objects[key] = blob
            return True

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        with self._lock:
            blob = self._objects.get(check_key(key))
        if blob is None:
            raise ObjectNotFound(self.url, key)
        end = check_range(self.url, key, len(blob), offset, length)
        return blob[offset:end]

    def head(self, key: str) -> int | None:
        with self._lock:
            blob = self._objects.get(check_key(key))
        return None if blob is None else len(blob)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._lock:
            found = [ObjectInfo(k, len(v)) for k, v in self._objects.items() if k.startswith(prefix)]
        return iter(found)

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(check_key(key), None)
