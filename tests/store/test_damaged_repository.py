"""An unreadable object, of every kind, in a real repository: every operation either
works with what is readable or fails with an error that names the object, the
snapshot that needs it and the command that fixes it; it exits non-zero, never with
a traceback, and deletes nothing that a snapshot may need.

Two snapshots of two VMs share no object: A's objects are damaged, B must stay
whole. Each object kind (config, lock, manifest, index file, region root, map
block, page frame, blob; in an encrypted repository also its key file) is missing,
truncated, or has a flipped byte, in an unencrypted and in an encrypted repository; the
operations are those of the CLI (`ls`, `show`, `verify --read-data`, `gc --dry-run`,
`gc`, `prune`, run in this process so that an escaping exception fails the test)
and reading both snapshots whole (RAM, a disk region, the state blob), as a
restore does. The VM-level restores (eager and lazy) are in
tests/snapshot/test_damaged_restore.py.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import pytest

from snapvisor.cli import main
from snapvisor.errors import SnapvisorError
from snapvisor.store import Repository
from snapvisor.store import format as fmt
from snapvisor.store.keys import KEY_PREFIX
from snapvisor.store.locks import SHARED
from snapvisor.store.manifest import snapshot_key

from store_helpers import SMALL_REPO, make_memory

KINDS = ["config", "lock", "manifest", "index", "region-root", "map-block", "page-frame", "blob"]
# (kind, encryption): every kind in both kinds of repository, key files where there are some.
CASES = [(kind, "plain") for kind in KINDS] + [(kind, "encrypted") for kind in KINDS + ["key"]]
DAMAGES = ["missing", "truncated", "flipped"]
FRAME_KINDS = {"region-root": fmt.KIND_REGION_ROOT, "map-block": fmt.KIND_MAP_BLOCK,
               "page-frame": fmt.KIND_PAGES, "blob": fmt.KIND_BLOB}
EXIT_DAMAGED = 3


@dataclass
class Damaged:
    url: str
    a: str  # the snapshot whose object is damaged
    b: str  # the snapshot that shares nothing with it
    key: str  # the damaged object
    packs_before: set[str]
    images: dict[str, dict[str, bytes]]  # snapshot -> region/blob -> bytes


def _write(repo: Repository, vm: str, seed: int) -> tuple[str, dict[str, bytes]]:
    # +seed on every byte: the two snapshots have no page (and so no object) in common.
    ram = ((make_memory(96, seed=seed).astype(np.uint16) + seed) % 256).astype(np.uint8)
    disk = ((make_memory(48, seed=seed + 10).astype(np.uint16) + seed) % 256).astype(np.uint8)
    state = f"state of {vm}".encode() * 20
    with repo.start_snapshot() as writer:
        writer.put_region("ram0", ram.nbytes, ram)
        writer.put_region("disk-vda", disk.nbytes, disk)
        writer.put_blob("vm-state", state)
        info = writer.commit(vm, meta={"kind": "full"})
    return info.id, {"ram0": ram.tobytes(), "disk-vda": disk.tobytes(), "vm-state": state}


def _victim(repo: Repository, kind: str, a: str) -> str:
    """The key of snapshot A's object of `kind` (for objects inside packs: its pack)."""
    if kind == "config":
        return fmt.CONFIG_KEY
    if kind == "key":
        return next(iter(repo.store.list(KEY_PREFIX))).key
    if kind == "manifest":
        return snapshot_key(a)
    if kind == "lock":
        repo.locks._write(SHARED, "snapshot")  # as a live writer leaves it, then damaged
        return next(iter(repo.store.list(fmt.LOCK_PREFIX))).key
    index = repo.refresh_index(full=True)
    region_root = repo._manifest(a).region_refs["ram0"].root
    a_index = index.packs[index.get(region_root)[0]].index_key
    if kind == "index":
        return a_index
    packs = [p for p in index.packs if p.index_key == a_index and (p.frames["kind"] == FRAME_KINDS[kind]).any()]
    return packs[0].key


def _damage(store, key: str, damage: str, kind: str, crypto) -> None:
    data = store.get(key)
    store.delete(key)
    if damage == "truncated":
        store.put(key, data[:len(data) // 2])
    elif damage == "flipped":
        flipped = bytearray(data)
        if key.startswith(fmt.DATA_PREFIX):
            # Inside a frame of the kind under test, not the trailer.
            frames = fmt.decode_pack_trailer(key, data, crypto)
            frame = frames[frames["kind"] == FRAME_KINDS[kind]][0]
            at = int(frame["offset"]) + int(frame["clen"]) // 2
        else:
            at = 0  # JSON objects: the opening brace; index files: the magic
        flipped[at] ^= 0x20
        store.put(key, bytes(flipped))


def _damaged(url: str, kind: str, damage: str) -> Damaged:
    repo = Repository.open_url(url, create=True, **SMALL_REPO)
    a, image_a = _write(repo, "vm-a", 1)
    b, image_b = _write(repo, "vm-b", 2)
    assert repo.encrypted == ("SNAPVISOR_PASSWORD_FILE" in os.environ)
    key = _victim(repo, kind, a)
    packs = {info.key for info in repo.store.list(fmt.DATA_PREFIX)}
    _damage(repo.store, key, damage, kind, repo.crypto)
    repo.close()
    return Damaged(url, a, b, key, packs, {a: image_a, b: image_b})


def _cli(capsys, *args: str) -> tuple[int, str]:
    """`snapvisor ARGS` in this process: (exit status, stdout + stderr). Anything but
    a SnapvisorError escapes main() and fails the test: a traceback for an operator."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def _restore(url: str, snapshot_id: str, image: dict[str, bytes]) -> None:
    """Read a snapshot whole, as an eager restore does (a lazy one reads the same
    objects through the same reader, block by block); check every byte."""
    with Repository.open_url(url) as repo:
        snapshot = repo.get_snapshot(snapshot_id)
        for region in ("ram0", "disk-vda"):
            reader = snapshot.region_reader(region)
            out = bytearray(reader.size)
            reader.read_into(out)
            assert out == image[region]
        assert snapshot.get_blob("vm-state") == image["vm-state"]


def _names_the_fix(message: str) -> bool:
    return re.search(r"`snapvisor (verify|repair-index|forget|gc)|another copy of the repository", message) is not None


def _check_operations(d: Damaged, kind: str, damage: str, capsys) -> None:
    url, a, b = d.url, d.a, d.b
    harmless = kind == "lock" or (kind == "manifest" and damage == "missing")  # a missing manifest: A was forgotten

    # -- config, key file: nothing opens, and the message says what to do ------------
    if kind in ("config", "key"):
        what = "`config` object is" if kind == "config" else (
            "has no key files" if damage == "missing" else f"key file {d.key} in .* is damaged")
        for args in (["ls"], ["show", b], ["verify"], ["gc"], ["gc", "--dry-run"], ["prune", "--keep-last", "9"]):
            code, out = _cli(capsys, *args, "--repo", url)
            assert code == 1 and re.search(what, out) and "another copy of the repository" in out, (args, out)
        with pytest.raises(SnapvisorError, match=what):
            _restore(url, b, d.images[b])
        return

    # -- B, which needs nothing damaged, restores and shows ---------------------------
    _restore(url, b, d.images[b])
    code, out = _cli(capsys, "show", b[:12], "--repo", url)
    assert code == 0 and "vm-b" in out, out

    # -- A: restores, or fails naming the object, A and the fix -----------------------
    if harmless:
        if kind == "lock":
            _restore(url, a, d.images[a])
    else:
        with pytest.raises(SnapvisorError) as failure:
            _restore(url, a, d.images[a])
        message = str(failure.value)
        object_named = d.key in message or (kind == "index" and damage == "missing")  # which file is unknowable
        assert object_named and a[:12] in message and _names_the_fix(message), message
        if kind == "index":
            assert "snapvisor repair-index" in message, message

    # -- ls: the others listed, the damaged one marked ---------------------------------
    code, out = _cli(capsys, "ls", "--repo", url)
    assert b[:12] in out, out
    if kind == "manifest" and damage != "missing":
        assert code == EXIT_DAMAGED and re.search(rf"{a[:12]}\s+DAMAGED", out) and "snapvisor forget" in out, out
    else:
        assert code == 0 and (a[:12] in out) == (kind != "manifest"), out

    # -- verify --read-data: the object and the snapshots that need it ------------------
    code, out = _cli(capsys, "verify", "--read-data", "--json", "--repo", url)
    report = json.loads(out[out.index("{"):])
    if harmless:
        assert code == 0 and report["damaged_snapshots"] == [], out
    else:
        assert code == EXIT_DAMAGED and (d.key in out or kind == "index" and damage == "missing"), out
        assert report["damaged_snapshots"] == [a], report  # which restore is lost, and only that one

    # -- gc --dry-run reports; gc deletes nothing A may need, or refuses ----------------
    code, out = _cli(capsys, "gc", "--dry-run", "--repo", url)
    if kind == "manifest" and damage != "missing":
        assert code == EXIT_DAMAGED and "would refuse" in out and a[:12] in out, out
    else:
        assert code in (0, 1) and (code == 0 or "nothing deleted" in out and _names_the_fix(out)), out
    code, out = _cli(capsys, "gc", "--repo", url)
    after = {info.key for info in Repository.open_url(url).store.list(fmt.DATA_PREFIX)}
    if harmless and kind == "manifest":
        assert code == 0  # A was forgotten: its data goes
    else:
        if code != 0:
            assert code == 1 and "nothing deleted" in out and _names_the_fix(out), out
        missing = d.key if d.key.startswith(fmt.DATA_PREFIX) and damage == "missing" else None
        assert after == d.packs_before - {missing}, "gc deleted data a snapshot may need"
    _restore(url, b, d.images[b])  # and B still whole
    if kind == "lock":
        assert not list(Repository.open_url(url).store.list(fmt.LOCK_PREFIX)), "gc left a stale lock"

    # -- prune judges the readable snapshots, keeps the damaged one ---------------------
    code, out = _cli(capsys, "prune", "--keep-last", "9", "--repo", url)
    assert code == (EXIT_DAMAGED if kind == "manifest" and damage != "missing" else 0), out
    assert b[:12] in out


def _encrypted(monkeypatch, tmp_path, encryption: str) -> None:
    """With "encrypted", the password file in the environment: the first snapshot
    creates an encrypted repository, and every command opens it."""
    if encryption == "encrypted":
        password = tmp_path / "password"
        password.write_text("damaged but secret\n")
        monkeypatch.setenv("SNAPVISOR_PASSWORD_FILE", str(password))


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("kind,encryption", CASES)
def test_every_operation_on_a_damaged_local_repository(kind: str, encryption: str, damage: str, tmp_path,
                                                       capsys, monkeypatch) -> None:
    _encrypted(monkeypatch, tmp_path, encryption)
    damaged = _damaged(str(tmp_path / "repo"), kind, damage)
    _on_another_host(monkeypatch, tmp_path)
    _check_operations(damaged, kind, damage, capsys)


def _on_another_host(monkeypatch, tmp_path) -> None:
    """An empty local index cache: the writer's host keeps intact copies of the index
    files it wrote (rightly: their names are their hashes), so damage to one shows
    on any other host."""
    monkeypatch.setenv("SNAPVISOR_CACHE", str(tmp_path / "other-host-cache"))


@pytest.mark.s3
@pytest.mark.parametrize("encryption", ["plain", "encrypted"])
@pytest.mark.parametrize("kind,damage", [("manifest", "flipped"), ("index", "truncated"),
                                         ("page-frame", "flipped"), ("map-block", "missing"),
                                         ("lock", "truncated")])
def test_damaged_s3_repository(kind: str, damage: str, encryption: str, s3_server, s3_bucket, capsys,
                               monkeypatch, tmp_path) -> None:
    import secrets

    endpoint, key, secret = s3_server
    for name, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", key),
                        ("AWS_SECRET_ACCESS_KEY", secret), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    url = f"s3://{s3_bucket}/{secrets.token_hex(6)}"
    _encrypted(monkeypatch, tmp_path, encryption)
    damaged = _damaged(url, kind, damage)
    _on_another_host(monkeypatch, tmp_path)
    _check_operations(damaged, kind, damage, capsys)
