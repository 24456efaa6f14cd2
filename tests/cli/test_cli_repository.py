"""The repository verbs and bad arguments, through the `snapvisor` command on a
real local repository: human and JSON output, exit codes, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import snapvisor
from snapvisor.store import PAGE_SIZE, Repository


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[str, list[str]]:
    """A repository with three snapshots of 'web1' and one of 'db1'."""
    path = str(tmp_path_factory.mktemp("cli-repo") / "repo")
    ids = []
    rng = np.random.default_rng(7)
    with Repository.open_url(path, create=True) as repository:
        for vm, tags in (("web1", ["first"]), ("web1", []), ("db1", ["db"]), ("web1", ["last"])):
            memory = rng.integers(0, 255, size=64 * PAGE_SIZE, dtype=np.uint8)
            with repository.start_snapshot() as writer:
                writer.put_region("ram0", memory.size, memory)
                writer.put_blob("vm-state", b"state")
                ids.append(writer.commit(vm=vm, tags=tags, meta={"kind": "full"}).id)
    return path, ids


def test_every_verb_has_help_and_the_exit_codes() -> None:
    top = snapvisor("--help")
    assert top.returncode == 0 and "exit status:" in top.stdout and "SNAPVISOR_REPO" in top.stdout
    for verb in ("snapshot", "restore", "ls", "show", "verify", "prune", "gc", "repair-index"):
        result = snapvisor(verb, "--help")
        assert result.returncode == 0 and "--repo" in result.stdout and "exit status:" in result.stdout, verb
        assert verb in top.stdout
    run = snapvisor("run", "--help").stdout
    for flag in ("--api-sock", "--snapshot-every", "--repo", "--name", "--keep-last", "--keep-daily"):
        assert flag in run


def test_ls_and_show(repo) -> None:
    path, ids = repo
    human = snapvisor("ls", "--repo", path)
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert lines[0].split() == ["ID", "TIME", "AGE", "VM", "KIND", "MEMORY", "TAGS"]
    assert [line.split()[0] for line in lines[1:5]] == [i[:12] for i in ids]
    assert "256 KiB" in lines[1] and "UTC" in lines[1] and lines[-1] == "4 snapshots"
    as_json = json.loads(snapvisor("ls", "--repo", path, "--vm", "web1", "--json").stdout)
    assert [s["id"] for s in as_json] == [ids[0], ids[1], ids[3]]
    assert as_json[0]["memory_bytes"] == 64 * PAGE_SIZE and as_json[0]["tags"] == ["first"]
    tagged = json.loads(snapvisor("ls", "--repo", path, "--tag", "db", "--json").stdout)
    assert [s["id"] for s in tagged] == [ids[2]]

    shown = snapvisor("show", "--repo", path, ids[2][:8])
    assert shown.returncode == 0 and f"snapshot  {ids[2]}" in shown.stdout and "db1" in shown.stdout
    detail = json.loads(snapvisor("show", "--repo", path, ids[2][:8], "--json").stdout)
    assert detail["id"] == ids[2] and detail["regions"] == {"ram0": 64 * PAGE_SIZE}


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
    (["ls", "--repo", "{missing}"], 1, "no snapvisor repository at"),
    (["ls", "--repo", "ftp://host/x"], 1, "unknown scheme"),
    (["show", "--repo", "{repo}", "XYZ"], 1, "'XYZ' is not a snapshot id"),
    (["show", "--repo", "{repo}", "abcdef0123"], 1, "no snapshot 'abcdef0123'"),
    (["restore", "--repo", "{repo}", "abcdef0123"], 1, "no snapshot 'abcdef0123'"),
    (["snapshot", "--api-sock", "{missing}", "--repo", "{repo}"], 4, "no VM answers on"),
    (["snapshot", "--api-sock", "{missing}"], 2, "no repository"),
], ids=["ls-no-repo", "prune-no-rule", "prune-negative", "prune-bad-within", "every-zero", "every-bad",
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
