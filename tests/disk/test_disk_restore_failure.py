"""An eager restore whose disk read fails part-way reports the read's own error,
names the damaged pack, and leaves no image behind: the failed read's frames held
views of the image's mapping, and closing it raised BufferError instead (seen in
CI on a cold move through S3). Every page frame of the snapshot is damaged in turn,
so the failure lands at every point of the read: first, inside, last frame."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import snapvisor
from disk_console import blank_image, snapshot_of_running_guest
from snapvisor.errors import SnapvisorError
from snapvisor.store import Repository
from snapvisor.store import format as fmt

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def snapshot(testguest: Path, tmp_path_factory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("disk-restore-failure")
    info = snapshot_of_running_guest(testguest, str(work / "repo"), blank_image(work / "vda.img", 4 << 20), rounds=2)
    return work / "repo", info.id


def _page_frames(root: Path) -> list[tuple[str, int, int]]:
    index = Repository.open_url(str(root)).refresh_index(full=True)
    return [(pack.key, int(frame["offset"]), int(frame["clen"]))
            for pack in sorted(index.packs, key=lambda p: p.key) for frame in pack.frames
            if frame["kind"] == fmt.KIND_PAGES]


def test_a_failed_disk_read_reports_its_own_error(snapshot, tmp_path: Path) -> None:
    source, snapshot_id = snapshot
    frames = _page_frames(source)
    assert len(frames) >= 2, frames
    for number, (key, offset, length) in enumerate(frames):
        root = tmp_path / f"repo-{number}"
        shutil.copytree(source, root)
        data = bytearray((root / key).read_bytes())
        data[offset + length // 2] ^= 0x20
        (root / key).write_bytes(bytes(data))
        disks = tmp_path / f"disks-{number}"
        disks.mkdir()
        with pytest.raises(SnapvisorError) as caught:
            snapvisor.restore(str(root), snapshot_id, disk_dir=disks, start=False)
        assert key in str(caught.value), caught.value
        assert list(disks.iterdir()) == [], "a failed restore left an image behind"
