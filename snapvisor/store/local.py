"""A repository in a local directory.

put writes a temporary file in the target directory, fsyncs it, then hard-links it
to its final name: link() fails when the name exists, which makes put-if-absent
atomic, and a crash leaves either nothing or the whole object under the final name
(temporary files are ignored by list and cleaned by gc).
"""

from __future__ import annotations

import errno
import os
import secrets
import time
from collections.abc import Iterator

from snapvisor.store.backend import ObjectInfo, ObjectStore, check_key, check_range
from snapvisor.store.errors import ObjectNotFound, StoreError

TMP_MARK = ".tmp-"


class LocalStore(ObjectStore):
    def __init__(self, path: str):
        self.root = os.path.abspath(path)
        self.url = "file://" + self.root
        self._made_dirs: set[str] = set()

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def _ensure_dir(self, directory: str) -> None:
        if directory in self._made_dirs:
            return
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create directory {directory}: {e.strerror}") from e
        self._made_dirs.add(directory)

    def put(self, key: str, data) -> bool:
        path = self._path(key)
        directory = os.path.dirname(path)
        self._ensure_dir(directory)
        tmp = f"{path}{TMP_MARK}{secrets.token_hex(8)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data).cast("B")
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
                created = True
            except FileExistsError:
                created = False
            finally:
                os.unlink(tmp)
            if created:
                _fsync_dir(directory)
            return created
        except OSError as e:
            raise StoreError(f"cannot write {key!r} to {self.url}: {e.strerror}") from e

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                end = check_range(self.url, key, size, offset, length)
                data = os.pread(f.fileno(), end - offset, offset)
        except FileNotFoundError:
            raise ObjectNotFound(self.url, key) from None
        except OSError as e:
            raise StoreError(f"cannot read {key!r} from {self.url}: {e.strerror}") from e
        if len(data) != end - offset:
            raise StoreError(f"object {key!r} in {self.url} shrank while being read")
        return data

    def head(self, key: str) -> int | None:
        try:
            return os.stat(self._path(key)).st_size
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot stat {key!r} in {self.url}: {e.strerror}") from e

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # Walk the deepest directory the prefix names fully, filter by the rest.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = os.path.join(self.root, *base.split("/")) if base else self.root
        if not os.path.isdir(top):
            return
        for dirpath, dirnames, filenames in os.walk(top):
            rel_dir = os.path.relpath(dirpath, self.root)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            dirnames.sort()
            for name in sorted(filenames):
                if TMP_MARK in name:
                    continue
                key = rel_dir + name
                if not key.startswith(prefix):
                    continue
                try:
                    size = os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:  # deleted while listing
                    continue
                yield ObjectInfo(key, size)

    def sweep(self, older_than: float) -> int:
        removed = 0
        cutoff = time.time() - older_than
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                if TMP_MARK not in name:
                    continue
                path = os.path.join(dirpath, name)
                try:
                    if os.stat(path).st_mtime < cutoff:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:  # its put finished meanwhile
                    continue
                except OSError as e:
                    raise StoreError(f"cannot remove leftover {path}: {e.strerror}") from e
        return removed

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"cannot delete {key!r} from {self.url}: {e.strerror}") from e


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # some filesystems cannot fsync dirs
            raise
    finally:
        os.close(fd)
