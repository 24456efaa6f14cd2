"""The repository verbs and bad arguments, through the `snapvisor` command on a
real local repository: human and JSON output, exit codes, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import snapvisor
from snapvisor.store import PAGE_SIZE, Repository


# A compatibility record as capture writes it (image/compat.py), made up.
COMPAT = {
    "image_format": {"major": 1, "minor": 0}, "snapvisor": "0.1.0",
    "host": {"kernel": "6.1.0-18-amd64", "machine": "x86_64"},
    "cpu_features": {"0x1.0.ecx": 0xF6FA3203, "0x1.0.edx": 0x178BFBFF, "0x7.0.ebx": 0x9C07AB, "0x7.0.ecx": 4,
                     "0x7.0.edx": 0, "0xd.1.eax": 1, "0x80000001.0.ecx": 0x121, "0x80000001.0.edx": 0x2C100800},
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[str, list[str]]:
    """A repository with three snapshots of 'web1' and one of 'db1', which has a
    128-block disk (region disk-vda) and a compatibility record."""
    path = str(tmp_path_factory.mktemp("cli-repo") / "repo")
    ids = []
    rng = np.random.default_rng(7)
    with Repository.open_url(path, create=True) as repository:
        for vm, tags in (("web1", ["first"]), ("web1", []), ("db1", ["db"]), ("web1", ["last"])):
            memory = rng.integers(0, 255, size=64 * PAGE_SIZE, dtype=np.uint8)
            meta: dict = {"kind": "full"}
            with repository.start_snapshot() as writer:
                writer.put_region("ram0", memory.size, memory)
                if vm == "db1":
                    disk = rng.integers(0, 255, size=128 * PAGE_SIZE, dtype=np.uint8)
                    writer.put_region("disk-vda", disk.size, disk)
                    meta["compat"] = COMPAT
                writer.put_blob("vm-state", b"state")
                ids.append(writer.commit(vm=vm, tags=tags, meta=meta).id)
    return path, ids


def test_every_verb_has_help_and_the_exit_codes() -> None:
    top = snapvisor("--help")
    assert top.returncode == 0 and "exit status:" in top.stdout and "SNAPVISOR_REPO" in top.stdout
    for verb in ("run", "snapshot", "restore", "ls", "show", "verify", "prune", "gc", "repair-index", "receive",
                 "migrate", "demo"):
        result = snapvisor(verb, "--help")
        assert result.returncode == 0 and "--repo" in result.stdout and "exit status:" in result.stdout, verb
        assert "SNAPVISOR_CACHE" in result.stdout, verb
        assert verb in top.stdout
    run = snapvisor("run", "--help").stdout
    for flag in ("--api-sock", "--snapshot-every", "--repo", "--name", "--keep-last", "--keep-daily"):
        assert flag in run
    assert "keep ;" not in snapvisor("prune", "--help").stdout
    assert "(default: the migrating VM's own name)" in " ".join(snapvisor("receive", "--help").stdout.split())


def test_ls_and_show(repo) -> None:
    path, ids = repo
    human = snapvisor("ls", "--repo", path)
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert lines[0].split() == ["ID", "TIME", "AGE", "VM", "KIND", "MEMORY", "DISKS", "TAGS"]
    assert [line.split()[0] for line in lines[1:5]] == [i[:12] for i in ids]
    assert "256 KiB" in lines[1] and "UTC" in lines[1] and lines[-1] == "4 snapshots"
    # MEMORY is RAM only; the disk has a column of its own ("-" without one).
    assert lines[1].split()[-3:] == ["KiB", "-", "first"]
    assert lines[3].split()[-5:] == ["256", "KiB", "512", "KiB", "db"]
    as_json = json.loads(snapvisor("ls", "--repo", path, "--vm", "web1", "--json").stdout)
    assert [s["id"] for s in as_json] == [ids[0], ids[1], ids[3]]
    assert as_json[0]["memory_bytes"] == 64 * PAGE_SIZE and as_json[0]["tags"] == ["first"]
    assert as_json[0]["disk_bytes"] == 0
    tagged = json.loads(snapvisor("ls", "--repo", path, "--tag", "db", "--json").stdout)
    assert [s["id"] for s in tagged] == [ids[2]]
    assert tagged[0]["memory_bytes"] == 64 * PAGE_SIZE and tagged[0]["disk_bytes"] == 128 * PAGE_SIZE

    shown = snapvisor("show", "--repo", path, ids[2][:8])
    assert shown.returncode == 0 and "db1" in shown.stdout
    width = len("compat.cpu_features") + 2
    lines = shown.stdout.splitlines()
    assert f"{'snapshot'.ljust(width)}{ids[2]}" in lines
    assert f"{'memory'.ljust(width)}ram0 256 KiB" in lines and f"{'disks'.ljust(width)}vda 512 KiB" in lines
    # The whole compatibility record, nested parts flattened, feature words in CPUID order.
    compat = [line for line in lines if line.startswith("compat.") or line.startswith(" ")]
    assert compat == [
        f"{'compat.image_format'.ljust(width)}1.0",
        f"{'compat.snapvisor'.ljust(width)}0.1.0",
        f"{'compat.host.kernel'.ljust(width)}6.1.0-18-amd64",
        f"{'compat.host.machine'.ljust(width)}x86_64",
        "compat.cpu_features  0x1.0.ecx=0xf6fa3203  0x1.0.edx=0x178bfbff  0x7.0.ebx=0x009c07ab",
        " " * width + "0x7.0.ecx=0x00000004  0x7.0.edx=0x00000000  0xd.1.eax=0x00000001",
        " " * width + "0x80000001.0.ecx=0x00000121  0x80000001.0.edx=0x2c100800",
    ]
    detail = json.loads(snapvisor("show", "--repo", path, ids[2][:8], "--json").stdout)
    assert detail["id"] == ids[2] and detail["regions"] == {"ram0": 64 * PAGE_SIZE, "disk-vda": 128 * PAGE_SIZE}
    assert detail["meta"]["compat"] == COMPAT
    plain = snapvisor("show", "--repo", path, ids[0][:8]).stdout
    assert "disks  " in plain and not any(line.startswith("compat.") for line in plain.splitlines())


def test_prune_per_vm_dry_run_then_for_real_and_gc(tmp_path: Path, repo) -> None:
    source, ids = repo
    path = str(tmp_path / "copy")
    import shutil

    shutil.copytree(source, path)
    dry = snapvisor("prune", "--repo", path, "--keep-last", "1", "--dry-run")
    assert dry.returncode == 0 and "2 kept, 2 to forget (dry run)" in dry.stdout, dry.stdout + dry.stderr
    assert len(json.loads(snapvisor("ls", "--repo", path, "--json").stdout)) == 4
    done = json.loads(snapvisor("prune", "--repo", path, "--keep-last", "1", "--vm", "web1", "--json").stdout)
    assert done["keep"] == [ids[3]] and sorted(done["remove"]) == sorted(ids[:2])
    assert [s["id"] for s in json.loads(snapvisor("ls", "--repo", path, "--json").stdout)] == [ids[2], ids[3]]
    gc = snapvisor("gc", "--repo", path)
    assert gc.returncode == 0 and "2 snapshots use" in gc.stdout, gc.stderr
    verify = snapvisor("verify", "--repo", path, "--read-data")
    assert verify.returncode == 0 and "repository OK" in verify.stdout


def test_verify_reports_damage_with_exit_3(tmp_path: Path, repo) -> None:
    import shutil

    path = tmp_path / "damaged"
    shutil.copytree(repo[0], path)
    pack = next(p for p in sorted((path / "data").rglob("*")) if p.is_file())
    pack.write_bytes(pack.read_bytes()[:-10])
    human = snapvisor("verify", "--repo", str(path))
    assert human.returncode == 3 and "damaged: pack" in human.stdout and "problem(s) found" in human.stdout
    report = json.loads(snapvisor("verify", "--repo", str(path), "--json").stdout)
    assert report["ok"] is False and report["errors"]


@pytest.mark.parametrize("args,code,message", [
    (["ls"], 2, "no repository: give --repo URL or set SNAPVISOR_REPO"),
    (["prune", "--repo", "{repo}"], 2, "prune needs at least one --keep-* rule"),
    (["prune", "--repo", "{repo}", "--keep-last", "-5"], 2, "'-5' must be -1 (no limit) or more"),
    (["prune", "--repo", "{repo}", "--keep-within", "soon"], 2, "'soon' is not a duration"),
    (["run", "--kernel", "/k", "--snapshot-every", "0"], 2, "'0' must be longer than zero"),
    (["run", "--kernel", "/k", "--snapshot-every", "5x"], 2, "'5x' is not a duration"),
    (["run", "--kernel", "/k", "--mem", "lots"], 2, "argument --mem: 'lots' is not a size (examples: 256M, 1G"),
    (["ls", "--repo", "{missing}"], 1, "create it with `snapvisor init --repo"),
    (["ls", "--repo", "ftp://host/x"], 1, "unknown scheme"),
    (["show", "--repo", "{repo}", "XYZ"], 1, "'XYZ' is not a snapshot id"),
    (["show", "--repo", "{repo}", "abcdef0123"], 1, "`snapvisor ls` lists the ones there"),
    (["restore", "--repo", "{repo}", "abcdef0123"], 1, "no snapshot 'abcdef0123'"),
    (["snapshot", "--api-sock", "{missing}", "--repo", "{repo}"], 4, "no VM answers on"),
    (["snapshot", "--api-sock", "{missing}"], 2, "no repository"),
], ids=["ls-no-repo", "prune-no-rule", "prune-negative", "prune-bad-within", "every-zero", "every-bad", "mem-bad",
        "ls-missing-repo", "ls-bad-scheme", "show-not-hex", "show-unknown", "restore-unknown", "snapshot-no-vm",
        "snapshot-no-repo"])
def test_bad_arguments_give_one_clear_line(tmp_path: Path, repo, args, code, message, monkeypatch) -> None:
    monkeypatch.delenv("SNAPVISOR_REPO", raising=False)
    args = [a.format(repo=repo[0], missing=tmp_path / "missing") for a in args]
    result = snapvisor(*args)
    assert result.returncode == code, (result.returncode, result.stderr)
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_repository_from_the_environment(repo) -> None:
    result = snapvisor("ls", "--json", env={"SNAPVISOR_REPO": repo[0]})
    assert result.returncode == 0 and len(json.loads(result.stdout)) == 4


@pytest.mark.kvm
@pytest.mark.parametrize("args,message", [
    (["--keep-last", "3"], "--keep-* applies after scheduled snapshots: add --snapshot-every"),
    (["--snapshot-every", "1s"], "--snapshot-every needs a repository"),
    (["--api-sock", "/nonexistent/dir/api.sock"], "cannot create the API socket /nonexistent/dir/api.sock"),
    (["--snapshot-every", "1s", "--repo", "/r", "--repo", "/r"], "a repository is listed twice"),
])
def test_bad_run_operation_flags(testguest: Path, monkeypatch, args, message) -> None:
    monkeypatch.delenv("SNAPVISOR_REPO", raising=False)
    result = snapvisor("run", "--kernel", str(testguest), "--mem", "16M", "--cmdline", "tg.mem=1 tg.rounds=1", *args)
    assert result.returncode in (1, 2) and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_repair_index_after_the_index_was_lost(tmp_path) -> None:
    path = str(tmp_path / "repo")
    memory = np.random.default_rng(3).integers(0, 255, size=64 * PAGE_SIZE, dtype=np.uint8)
    with Repository.open_url(path, create=True) as repository:
        with repository.start_snapshot() as writer:
            writer.put_region("ram0", memory.size, memory)
            writer.put_blob("vm-state", b"state")
            snapshot_id = writer.commit(vm="web1", meta={"kind": "full"}).id
    for index_file in (Path(path) / "index").iterdir():
        index_file.unlink()

    damaged = snapvisor("verify", "--repo", path)
    assert damaged.returncode == 3 and "snapvisor repair-index" in damaged.stdout, damaged.stdout
    dry = snapvisor("repair-index", "--repo", path, "--dry-run", "--json")
    assert dry.returncode == 0 and json.loads(dry.stdout)["packs_reindexed"] >= 1
    assert not any((Path(path) / "index").iterdir())
    repaired = snapvisor("repair-index", "--repo", path)
    assert repaired.returncode == 0 and "indexed" in repaired.stdout, repaired.stderr
    assert snapvisor("verify", "--repo", path, "--read-data").returncode == 0
    with Repository.open_url(path) as repository:
        out = bytearray(memory.size)
        repository.get_snapshot(snapshot_id).region_reader("ram0").read_into(out)
        assert bytes(out) == memory.tobytes()
