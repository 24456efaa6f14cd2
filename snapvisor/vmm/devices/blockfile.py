"""A raw disk image file behind a block device: positioned I/O straight between
the file and guest memory, and the record of which 4 KiB blocks were written
since the last snapshot took them (the disk's dirty log).

The image is locked (flock: exclusive when writable, shared when read-only) so
that two VMs never write one image, and is never resized while attached.

An image may still be filling in when the guest starts (a lazy restore): its
`filler` then brings blocks in before they are read or partly written. That hook
is all the device layer knows of it; the repository side lives in
snapvisor/image/lazydisk.py, so devices never import the store.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

from snapvisor.errors import SnapvisorError
from snapvisor.vmm.extents import populated_pages

if TYPE_CHECKING:
    import numpy as np

BLOCK_SIZE = 4096  # dirty-tracking and snapshot granularity: the repository's page size
SECTOR_SIZE = 512


class DiskError(SnapvisorError):
    """A disk image cannot be attached, or a disk option is malformed."""


class FillError(DiskError):
    """Blocks of an image that a lazy restore is still filling could not be brought in."""


class Filler(Protocol):
    """Brings in the blocks of an image that is not complete yet (a lazy restore).
    Every method raises FillError when the blocks cannot be had."""

    def before_read(self, offset: int, length: int) -> None:
        """Put every block of [offset, offset+length) into the file."""

    def before_write(self, offset: int, length: int) -> None:
        """Put the blocks the write covers only in part into the file, and leave
        every block it covers to the guest from now on (never filled over)."""

    def wait(self) -> None:
        """Return once every block of the image is in the file."""


@dataclass(frozen=True)
class DiskConfig:
    path: Path
    readonly: bool = False


def _check_size(path: Path, size: int) -> None:
    if size == 0 or size % BLOCK_SIZE:
        raise DiskError(
            f"disk image {path} is {size} bytes; its size must be a non-zero multiple of "
            f"{BLOCK_SIZE} (resize it with `truncate -s <size> {path}`)"
        )


def check_disk_image(disk: DiskConfig) -> None:
    """The DiskError that attaching `disk` would raise, found before a VM exists.

    Permission bits are honoured even for root, who could open anything: a
    file whose mode says read-only is a golden image not to be written by
    mistake, so it needs `readonly` said out loud."""
    path = disk.path
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DiskError(f"disk image {path} does not exist; give the path of an existing image (make one with `truncate -s 1G {path}`)") from None
    except OSError as exc:
        raise DiskError(f"cannot reach disk image {path}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise DiskError(f"disk image {path} is a directory; give the path of an image file")
    if not stat.S_ISREG(info.st_mode):
        raise DiskError(f"disk image {path} is not a regular file; give the path of an image file")
    mode = stat.S_IMODE(info.st_mode)
    if not (info.st_mode & stat.S_IRUSR and os.access(path, os.R_OK)):
        raise DiskError(f"disk image {path} is not readable (mode {mode:04o}); make it readable: `chmod u+r {path}`")
    read_only_fs = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    if not disk.readonly and (read_only_fs or not (info.st_mode & stat.S_IWUSR and os.access(path, os.W_OK))):
        where = "on a read-only file system" if read_only_fs else f"read-only (mode {mode:04o})"
        raise DiskError(
            f"disk image {path} is {where}; attach it read-only (`--disk {path},readonly`) or make it writable (`chmod u+w {path}`)"
        )
    _check_size(path, info.st_size)


class BlockFile:
    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        try:
            self.fd = os.open(self.path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            mode = "reading" if readonly else "reading and writing"
            raise DiskError(f"cannot open disk image {self.path} for {mode}: {exc.strerror}") from None
        try:
            self._lock_image()
            self.size = os.fstat(self.fd).st_size
            _check_size(self.path, self.size)
        except BaseException:
            os.close(self.fd)
            raise
        self.blocks = self.size // BLOCK_SIZE
        self._dirty = bytearray(self.blocks)  # one byte per block: 1 = written since the last fetch
        self._dirty_lock = threading.Lock()
        self.bytes_written = 0  # by the guest since attach: for statistics and benchmarks
        self._snapshot_map: mmap.mmap | None = None
        # Set while a lazy restore fills the image, None once it is complete: the
        # I/O path of a complete image costs one attribute check.
        self.filler: Filler | None = None

    def _lock_image(self) -> None:
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if self.readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DiskError(
                    f"disk image {self.path} is in use by another VM (it holds a lock on it); "
                    "give each VM its own image, or attach it read-only everywhere"
                ) from None
            raise DiskError(f"cannot lock disk image {self.path}: {exc.strerror}") from None

    # --- I/O (offsets and lengths checked by the caller against self.size) ------------------
    def read_into(self, offset: int, buffers: Sequence[memoryview]) -> bool:
        """Fill `buffers` from the image at `offset`; False on a short read or an error."""
        want = sum(len(b) for b in buffers)
        try:
            if self.filler is not None and want:
                self.filler.before_read(offset, want)
            return os.preadv(self.fd, buffers, offset) == want
        except (OSError, FillError):
            return False

    def write_from(self, offset: int, buffers: Sequence[memoryview]) -> bool:
        """Write `buffers` to the image at `offset` and record the blocks as dirty
        (after the write: a snapshot that fetches in between sees them next time)."""
        length = sum(len(b) for b in buffers)
        try:
            if self.filler is not None and length:
                self.filler.before_write(offset, length)
            done = os.pwritev(self.fd, buffers, offset)
        except (OSError, FillError):
            return False
        if length:
            self.mark_dirty(offset, length)
        self.bytes_written += done
        return done == length

    def flush(self) -> bool:
        try:
            os.fdatasync(self.fd)
        except OSError:
            return False
        return True

    # --- dirty-block tracking ---------------------------------------------------------------------
    def mark_dirty(self, offset: int, length: int) -> None:
        first, last = offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE
        with self._dirty_lock:
            self._dirty[first : last + 1] = b"\x01" * (last + 1 - first)

    def fetch_dirty(self) -> "np.ndarray":
        """Bool array, one entry per block, of blocks written since the previous
        fetch (or since the image was attached); tracking goes on."""
        import numpy as np

        with self._dirty_lock:
            taken = bytes(self._dirty)
            self._dirty[:] = bytes(self.blocks)
        return np.frombuffer(taken, dtype=np.uint8).astype(bool)

    def wait_filled(self) -> None:
        """Return once every block is in the file (at once unless a lazy restore is
        still filling it); FillError if that fill failed. Anything that reads the
        image whole (a full snapshot, a migration) calls this first."""
        filler = self.filler
        if filler is not None:
            filler.wait()

    def data_blocks(self) -> "np.ndarray":
        """Bool array of the blocks the file has data for (holes of a sparse file
        read as zeros and need not be read): what a full snapshot must look at.
        Waits for a lazy restore's fill: until then holes are not zeros."""
        self.wait_filled()
        return populated_pages(self.fd, self.size, BLOCK_SIZE)

    def snapshot_view(self) -> memoryview:
        """The whole image mapped read-only (shared: it shows every completed
        write), for a snapshot to copy blocks from without a system call per block.
        Blocks a lazy restore has not filled yet read as zeros here: read only
        blocks the guest wrote, or the whole after wait_filled()."""
        if self._snapshot_map is None:
            # Through a file description of its own: a mapping that outlives close()
            # (a caller still holding a view) must not keep the image's lock.
            fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._snapshot_map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
            finally:
                os.close(fd)
        return memoryview(self._snapshot_map)

    def close(self) -> None:
        if self._snapshot_map is not None:
            try:
                self._snapshot_map.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes with it
            self._snapshot_map = None
        if self.fd >= 0:
            os.close(self.fd)  # also drops the flock
            self.fd = -1
