"""Which 4 KiB pages of a file hold data: holes read as zeros and need no reading.

Guest RAM is a memfd and disks are sparse files; both answer SEEK_DATA/SEEK_HOLE,
so a full snapshot looks only at what was ever written. Reading a hole through a
shared mapping would also allocate it, growing the VMM by the size of the guest.
"""

from __future__ import annotations

import errno
import os

import numpy as np


def populated_pages(fd: int, size: int, page_size: int = 4096) -> np.ndarray:
    """Bool array, one per page of the first `size` bytes of `fd`: True where the
    file may hold data (all True where the file system cannot tell)."""
    mask = np.zeros(-(-size // page_size), dtype=bool)
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                break
            mask[offset // page_size :] = True
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        mask[start // page_size : -(-end // page_size)] = True
        offset = end
    return mask
