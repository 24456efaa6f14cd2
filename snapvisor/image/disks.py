"""Disks in snapshots: each attached disk is a repository region named
`disk-<name>` (disk-vda, ...) whose pages are the disk's 4 KiB blocks, so disk
data dedups with memory and with other VMs' disks in the same repository.

Capture copies a disk's blocks like guest pages (the first snapshot its data
blocks, later ones the blocks written since); restore writes them into a sparse
image file, leaving zero blocks as holes (a lazy restore: lazydisk.py, behind the
guest).
"""

from __future__ import annotations

import gc
import mmap
import os
import traceback
from pathlib import Path

from snapvisor.errors import SnapvisorError
from snapvisor.store import RegionReader
from snapvisor.vmm.devices.blockfile import BlockFile
from snapvisor.vmm.devices.virtio.block import VirtioBlock
from snapvisor.vmm.vm import Vm

REGION_PREFIX = "disk-"


class DiskRestoreError(SnapvisorError):
    """A disk of a snapshot could not be written out; nothing was started."""


def region_name(disk_name: str) -> str:
    return REGION_PREFIX + disk_name


def attached_disks(vm: Vm) -> dict[str, BlockFile]:
    """Disk name (vda, ...) -> its image, for every virtio-blk device of `vm`."""
    disks = {}
    for device in vm.devices.values():
        block = getattr(device, "device", None)
        if isinstance(block, VirtioBlock):
            disks[block.name] = block.disk
    return disks


def create_image(path: Path, size: int) -> int:
    """A new, all-hole image file of `size` bytes at `path`, open for writing.
    Refuses to overwrite."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise DiskRestoreError(
            f"{path} already exists; restore disks into an empty directory (or remove the file)"
        ) from None
    except OSError as exc:
        raise DiskRestoreError(f"cannot create disk image {path}: {exc.strerror}") from None
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        raise DiskRestoreError(f"cannot make disk image {path} {size} bytes long: {exc.strerror}") from None
    return fd


def write_sparse_image(reader: RegionReader, path: Path) -> None:
    """Write the region as a new image file at `path`; only non-zero blocks are
    written, so the file is as sparse as the disk was. Refuses to overwrite."""
    fd = create_image(path, reader.size)
    try:
        image = mmap.mmap(fd, reader.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            reader.read_into(image)
            image.flush()
        except BaseException as exc:
            # The failed read's frames still hold views of the mapping: drop them, so
            # that it can be unmapped and the caller sees the read's own error.
            release_frames(exc)
            raise
        finally:
            close_mapping(image)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def close_mapping(mapping: mmap.mmap) -> None:
    """Unmap `mapping` (written and flushed by then). A view of it may outlive the
    read that made it, in a reference cycle the collector has not freed yet (seen
    on reads through S3): collect, and where a view still lives the mapping goes
    with it. Never a BufferError in place of the caller's result."""
    try:
        mapping.close()
    except BufferError:
        gc.collect()
        try:
            mapping.close()
        except BufferError:
            pass


def release_frames(exc: BaseException | None) -> None:
    """Clear the local variables of the finished frames in `exc`'s traceback and in
    those of the exceptions it chains: a buffer their views point into can then be
    closed (else BufferError, hiding `exc`). The tracebacks still print."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
