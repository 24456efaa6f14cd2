"""populated_pages: a full snapshot reads only the pages a memfd or sparse file holds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from snapvisor.vmm.extents import populated_pages

PAGE = 4096


def test_memfd_holes_are_not_populated() -> None:
    fd = os.memfd_create("extents-test")
    try:
        os.ftruncate(fd, 256 * PAGE)
        os.pwrite(fd, b"x", 3 * PAGE + 10)
        os.pwrite(fd, b"y" * (2 * PAGE), 100 * PAGE)
        mask = populated_pages(fd, 256 * PAGE)
    finally:
        os.close(fd)
    assert np.flatnonzero(mask).tolist() == [3, 100, 101]


def test_sparse_file_with_blocks_of_another_size(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
        f.seek(40 << 20)
        f.write(b"z" * 100)
    with open(path, "rb") as f:
        mask = populated_pages(f.fileno(), 64 << 20, 1 << 20)
    assert len(mask) == 64 and mask[40] and mask.sum() <= 2  # file systems may round extents up


def test_an_empty_file_has_no_pages_to_read(tmp_path: Path) -> None:
    path = tmp_path / "empty.img"
    path.write_bytes(b"")
    os.truncate(path, 8 * PAGE)
    with open(path, "rb") as f:
        assert not populated_pages(f.fileno(), 8 * PAGE).any()
