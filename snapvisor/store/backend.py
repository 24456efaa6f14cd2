"""The object store interface every backend implements, and URL dispatch.

Five verbs, borgstore-sized: put-if-absent, ranged get, head, list by prefix,
delete; plus `sweep` for the leftovers of interrupted puts. Keys are '/'-separated relative names ("data/ab/ab12...", "config").
Objects are immutable: put never replaces an existing object, so two writers can
never destroy each other's data.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass

from snapvisor.store.errors import StoreError


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class ObjectStore(abc.ABC):
    url: str

    @abc.abstractmethod
    def put(self, key: str, data) -> bool:
        """Store `data` (bytes-like) under `key` unless the key exists.

        Returns True when written, False when an object was already there (left as is).
        The object is durable when this returns.
        """

    @abc.abstractmethod
    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes [offset, offset+length) of the object (to its end when length is None).

        Raises ObjectNotFound, or StoreError when the object is shorter than asked.
        """

    @abc.abstractmethod
    def head(self, key: str) -> int | None:
        """The object's size, or None when it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, in no particular order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; removing a missing object is not an error."""

    def sweep(self, older_than: float) -> int:
        """Remove what interrupted puts left behind (a killed writer's temporary
        files, unfinished multipart uploads) that is older than `older_than`
        seconds, so still-running puts are left alone; returns how many. Such
        leftovers are never visible as objects, only as space. gc calls this."""
        return 0

    def close(self) -> None:
        """Release connections and threads."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"


def check_key(key: str) -> str:
    """Keys are produced by the repository; refuse anything that could escape a prefix."""
    if not key or key.startswith("/") or "\\" in key or "\0" in key or any(
            part in ("", ".", "..") for part in key.split("/")):
        raise StoreError(f"invalid object key {key!r}")
    return key


def check_range(url: str, key: str, size: int, offset: int, length: int | None) -> int:
    """Validate a byte range against an object's size; returns the end offset."""
    end = size if length is None else offset + length
    if offset < 0 or (length is not None and length < 0):
        raise StoreError(f"invalid byte range {offset}+{length} for {key!r} in {url}")
    if end > size:
        raise StoreError(f"object {key!r} in {url} is truncated: {size} bytes, "
                         f"asked for bytes {offset}..{end}")
    return end


def open_backend(url: str, **options) -> ObjectStore:
    """An ObjectStore for a repository URL.

    "/path" or "file:///path": a local directory; "s3://bucket/prefix": S3 (endpoint,
    credentials and retries the boto3 way: AWS_ENDPOINT_URL, AWS_PROFILE, the
    environment, ~/.aws; `options` may give endpoint_url, profile, ...);
    "memory://name": an in-process store shared by every open of the same name.
    """
    if url.startswith("s3://"):
        from snapvisor.store.s3 import S3Store

        return S3Store(url, **options)
    if url.startswith("memory://"):
        from snapvisor.store.memory import MemoryStore

        return MemoryStore.named(url)
    if url.startswith("file://"):
        path = url[len("file://"):]
        if not path.startswith("/"):
            raise StoreError(f"repository URL {url!r}: file:// URLs need an absolute path "
                             f"(file:///srv/repo)")
        from snapvisor.store.local import LocalStore

        return LocalStore(path)
    if "://" in url:
        raise StoreError(f"repository URL {url!r}: unknown scheme; use a path, file:///path, "
                         f"s3://bucket/prefix or memory://name")
    from snapvisor.store.local import LocalStore

    return LocalStore(url)
