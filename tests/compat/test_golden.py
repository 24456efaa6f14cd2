"""Every golden repository under tests/fixtures/golden/ (written by an older release,
see make_golden.py there) restores exactly with this release: the same guest RAM,
disks and vCPU registers, and the guest runs on from it, checking its own memory and
disk every round. A failure here means this release broke a snapshot a user already
has: add an upgrade for the part whose format changed (docs/format.md)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest

import snapvisor
from snapvisor.image.capture import STATE_BLOB
from snapvisor.image.compat import IncompatibleSnapshot
from snapvisor.image.disks import region_name
from snapvisor.image.state_codec import decode_state
from snapvisor.store import Repository

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"
VERSIONS = sorted(path.parent.name for path in GOLDEN.glob("v*/expect.json"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "disk"))
from disk_console import assert_healthy, wait_for_disk_rounds  # noqa: E402


def test_golden_repositories_are_present() -> None:
    assert "v1" in VERSIONS, f"no golden repository v1 under {GOLDEN}"


@pytest.fixture(params=VERSIONS)
def golden(request, tmp_path) -> tuple[Repository, dict]:
    """A copy of one golden repository (opening a repository may write to it) and its expectations."""
    source = GOLDEN / request.param
    shutil.copytree(source / "repo", tmp_path / "repo")
    (tmp_path / "repo" / "locks").mkdir(exist_ok=True)  # git keeps no empty folders
    return Repository.open_url(str(tmp_path / "repo")), json.loads((source / "expect.json").read_text())


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def test_golden_snapshots_read_back_exactly(golden) -> None:
    """The stored format alone, no KVM needed: every region and the state decode to
    what the release that wrote them restored."""
    repo, expect = golden
    assert [info.id for info in repo.list_snapshots()] == [s["id"] for s in expect["snapshots"]]
    for expected in expect["snapshots"]:
        snapshot = repo.get_snapshot(expected["id"])
        state = decode_state(snapshot.get_blob(STATE_BLOB))
        memory = hashlib.sha256()
        for region in state["memory"]["regions"]:
            buffer = bytearray(int(region["size"]))
            snapshot.region_reader(region["name"]).read_into(buffer)
            memory.update(buffer)
        assert memory.hexdigest() == expected["memory_sha256"], f"{expected['kind']} snapshot: guest RAM differs"
        for disk, digest in expected["disks_sha256"].items():
            reader = snapshot.region_reader(region_name(disk))
            buffer = bytearray(reader.size)
            reader.read_into(buffer)
            assert _sha256(buffer) == digest, f"{expected['kind']} snapshot: disk {disk} differs"
        assert [_sha256(vcpu["regs"]) for vcpu in state["vcpus"]] == expected["vcpu_regs_sha256"]


def _restore(repo: Repository, snapshot_id: str, tmp_path: Path, **kwargs) -> tuple[snapvisor.VM, io.BytesIO]:
    console = io.BytesIO()
    disk_dir = tmp_path / f"disks-{snapshot_id[:12]}-{kwargs.get('lazy', False)}"
    disk_dir.mkdir()
    try:
        vm = snapvisor.restore(repo, snapshot_id, disk_dir=disk_dir, serial_out=console, **kwargs)
    except IncompatibleSnapshot as exc:
        if "CPU features" in str(exc):
            pytest.skip(f"this host cannot run the golden guest (its format is checked without KVM above): {exc}")
        raise
    return vm, console


@pytest.mark.kvm
def test_golden_snapshots_restore_and_run(golden, tmp_path) -> None:
    """Eager restore of each snapshot gives the recorded RAM and disks, vCPU state
    included; started, the guest goes on verifying its memory and disk."""
    repo, expect = golden
    for expected in expect["snapshots"]:
        vm, console = _restore(repo, expected["id"], tmp_path, start=False)
        with vm:
            memory = hashlib.sha256()
            for region in vm.vm.memory.regions:
                memory.update(region.view)
            assert memory.hexdigest() == expected["memory_sha256"], f"{expected['kind']} snapshot: guest RAM differs"
            disks = {path.stem: path for path in (tmp_path / f"disks-{expected['id'][:12]}-False").glob("*.img")}
            for disk, digest in expected["disks_sha256"].items():
                with disks[disk].open("rb") as file:
                    assert hashlib.file_digest(file, "sha256").hexdigest() == digest
            vm.vm.start()
            wait_for_disk_rounds(console, 2)
            vm.stop()
        assert_healthy(console.getvalue())


@pytest.mark.kvm
def test_golden_newest_snapshot_restores_lazily(golden, tmp_path) -> None:
    repo, expect = golden
    newest = expect["snapshots"][-1]
    vm, console = _restore(repo, newest["id"], tmp_path, lazy=True)
    with vm:
        wait_for_disk_rounds(console, 2)  # each round checks guest pages and disk blocks against their seeds
        vm.lazy_memory.wait()
        vm.lazy_disks.wait()
        wait_for_disk_rounds(console, 1)
        vm.stop()
    assert_healthy(console.getvalue())
