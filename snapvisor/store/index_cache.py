"""A local cache of decoded index files: opening a repository then reads its index
from local disk instead of downloading, hashing and decompressing all of it again
(a restore from S3 on a host that has seen the repository starts at once).

An index file's name is the SHA-256 of its bytes, so a cached copy never goes out
of date; copies of files that are no longer listed (gc replaced them) are pruned.
Each copy is a directory of .npy arrays, written under a temporary name and renamed
into place. The cache holds nothing the repository does not hold: deleting it is
always safe, and any copy that does not read back cleanly is dropped and fetched
again.

An encrypted repository's index must not lie on disk in the clear: its cache
(`SealedIndexCache`) keeps the index files as stored, sealed, which is only what
a reader of the bucket sees; loading one checks its name and unseals it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from snapvisor.cache import cache_root
from snapvisor.store import format as fmt
from snapvisor.store.crypto import NoEncryption
from snapvisor.store.errors import SnapvisorError

_ARRAYS = {"packs": fmt.PACK_RECORD_DTYPE, "frames": fmt.FRAME_DTYPE, "entries": fmt.ENTRY_DTYPE}


class IndexCache:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def for_repository(cls, repository_id: str) -> "IndexCache":
        return cls(cache_root() / "index" / repository_id)

    def _path(self, key: str) -> Path:
        return self.directory / key[len(fmt.INDEX_PREFIX):]

    def load(self, key: str) -> fmt.IndexFile | None:
        """The cached copy of index file `key`, or None."""
        path = self._path(key)
        try:
            arrays = {name: np.load(path / f"{name}.npy", allow_pickle=False) for name in _ARRAYS}
        except (OSError, ValueError, EOFError):
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
            return None
        packs, frames = arrays["packs"], arrays["frames"]
        if any(arrays[name].dtype != dtype for name, dtype in _ARRAYS.items()) or \
                int(packs["nframes"].sum()) != len(frames):
            shutil.rmtree(path, ignore_errors=True)
            return None
        bounds = np.cumsum(packs["nframes"].astype(np.int64))[:-1]
        return fmt.IndexFile(packs, np.split(frames, bounds) if len(packs) else [], arrays["entries"])

    def save(self, key: str, index_file: fmt.IndexFile, stored: bytes) -> None:
        """Keep a copy of index file `key` (decoded: `index_file`, as stored: `stored`);
        best effort (a full or read-only disk only costs speed)."""
        frames = np.concatenate(index_file.frames) if index_file.frames else np.empty(0, fmt.FRAME_DTYPE)
        self._write(key, lambda staging: [
            np.save(staging / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
            for name, array in (("packs", index_file.packs), ("frames", frames), ("entries", index_file.entries))])

    def _write(self, key: str, fill) -> None:
        """Fill a staging directory with `fill(path)`, then rename it to the copy of `key`."""
        path = self._path(key)
        if path.exists():
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.directory))
            try:
                fill(staging)
                os.rename(staging, path)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
        except OSError:
            pass

    def prune(self, keys: set[str]) -> None:
        """Drop the copies of index files not in `keys` (the repository's listing)."""
        names = {key[len(fmt.INDEX_PREFIX):] for key in keys}
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return
        for entry in entries:
            # Staging directories of a writer that is still saving are left alone
            # unless they are old (a crashed writer's).
            if entry.name.startswith(".tmp-") and not _older_than(entry, 3600):
                continue
            if entry.name not in names:
                shutil.rmtree(entry.path, ignore_errors=True)


class SealedIndexCache(IndexCache):
    """The cache of an encrypted repository: index files as stored (sealed)."""

    def __init__(self, directory: Path, crypto: NoEncryption) -> None:
        super().__init__(directory)
        self.crypto = crypto

    @classmethod
    def for_encrypted(cls, repository_id: str, crypto: NoEncryption) -> "SealedIndexCache":
        return cls(cache_root() / "index" / repository_id, crypto)

    def load(self, key: str) -> fmt.IndexFile | None:
        path = self._path(key)
        try:
            return fmt.decode_index(key, (path / "sealed").read_bytes(), self.crypto)
        except (OSError, SnapvisorError):
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
            return None

    def save(self, key: str, index_file: fmt.IndexFile, stored: bytes) -> None:
        self._write(key, lambda staging: (staging / "sealed").write_bytes(stored))


def _older_than(entry: os.DirEntry, seconds: float) -> bool:
    try:
        return time.time() - entry.stat().st_mtime > seconds
    except OSError:
        return False
