"""Disks from the command line: `run --disk PATH[,readonly]` (repeatable) and
`restore --disk-dir DIR`, through a subprocess as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from disk_console import CMDLINE, DISK_BLOCKS, assert_healthy, blank_image, disk_rounds, snapshot_of_running_guest
from snapvisor.store import Repository

MiB = 1 << 20


def snapvisor_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snapvisor", *args], capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


@pytest.mark.kvm
def test_run_attaches_disks_in_order(testguest: Path, tmp_path: Path) -> None:
    first = blank_image(tmp_path / "a.img", 2 * MiB)
    second = blank_image(tmp_path / "b.img", MiB)
    result = snapvisor_cli(
        "run", "--kernel", str(testguest), "--mem", "32M", "--cmdline", CMDLINE.replace("tg.rounds=0", "tg.rounds=3"),
        "--disk", str(first), "--disk", f"{second},readonly",
    )
    assert result.returncode == 0, result.stderr
    assert_healthy(result.stdout)
    assert b"tg: disk ok sectors=4096" in result.stdout  # the guest drives the first disk, vda
    assert [r for r, _, v in disk_rounds(result.stdout) if v == DISK_BLOCKS] == [0, 1, 2, 3]
    assert first.read_bytes() != bytes(2 * MiB) and second.read_bytes() == bytes(MiB)


@pytest.mark.parametrize(
    "disk,message,code",
    [
        ("{tmp}/missing.img", "missing.img does not exist; give the path of an existing image", 1),
        ("{tmp}/odd.img", "multiple of 4096", 1),
        ("{tmp}/ok.img,rw", "unknown disk option 'rw'", 2),
    ],
    ids=["missing", "odd-size", "bad-option"],
)
def test_bad_disk_gives_a_clear_error(testguest: Path, tmp_path: Path, disk: str, message: str, code: int) -> None:
    (tmp_path / "odd.img").write_bytes(b"x" * 1000)
    blank_image(tmp_path / "ok.img", MiB)
    result = snapvisor_cli("run", "--kernel", str(testguest), "--disk", disk.format(tmp=tmp_path))
    assert result.returncode == code and b"Traceback" not in result.stderr
    assert message.encode() in result.stderr, result.stderr


@pytest.mark.kvm
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_restore_writes_the_disks_into_disk_dir(testguest: Path, tmp_path: Path, lazy: bool) -> None:
    image = blank_image(tmp_path / "disk.img", 4 * MiB)
    repo_path = tmp_path / "repo"
    repo = Repository.open_url(str(repo_path), create=True)
    # A bounded run: the restored guest goes on to round 40 and powers off.
    info = snapshot_of_running_guest(testguest, repo, image, 3, CMDLINE.replace("tg.rounds=0", "tg.rounds=40"))
    listed = json.loads(snapvisor_cli("ls", "--repo", str(repo_path), "--json").stdout)
    assert [(s["memory_bytes"], s["disk_bytes"]) for s in listed] == [(32 * MiB, 4 * MiB)]  # RAM and disk apart
    refused = snapvisor_cli("restore", "--repo", str(repo_path), info.id)
    assert refused.returncode == 1 and b"--disk-dir" in refused.stderr and b"Traceback" not in refused.stderr
    disk_dir = tmp_path / "restored"
    disk_dir.mkdir()
    result = snapvisor_cli("restore", "--repo", str(repo_path), info.id, "--disk-dir", str(disk_dir),
                           *(["--lazy"] if lazy else []))
    assert result.returncode == 0, result.stderr
    assert_healthy(result.stdout)
    assert result.stdout.endswith(b"tg: done\n")
    assert disk_rounds(result.stdout)[-1] == (40, 8, DISK_BLOCKS)
    assert (disk_dir / "vda.img").stat().st_size == 4 * MiB
    assert b"incomplete" not in result.stderr
