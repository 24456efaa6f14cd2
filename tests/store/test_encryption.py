"""Encrypted repositories: nothing of the guest in any stored byte, every object
authenticated, keys and passwords as restic users expect them (real files, the
real S3 server)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from snapvisor.store import Repository, open_backend
from snapvisor.store import format as fmt
from snapvisor.store import pagehash
from snapvisor.store.crypto import Encryption
from snapvisor.store.errors import KeyFileError, PasswordNeeded, RepositoryError, WrongPassword
from snapvisor.store.keys import KEY_PREFIX
from snapvisor.store.password import PasswordSource, PasswordSourceError

from store_helpers import SMALL_REPO, TEST_PASSWORD, make_memory, object_listing, read_all
from testsupport import page_words, words_found


def _snapshot(repo: Repository, memory: np.ndarray, vm: str = "vm1", parent: str | None = None):
    with repo.start_snapshot(parent=parent) as writer:
        writer.put_region("ram0", memory.nbytes, memory)
        writer.put_blob("vm-state", b"TLS session key 0123456789abcdef" * 8)
        return writer.commit(vm, tags=["nightly"])


def _secret_memory(npages: int = 192) -> np.ndarray:
    """Random pages (incompressible: stored raw when unencrypted) and text pages."""
    return make_memory(npages, seed=42)


def test_no_page_content_or_page_id_in_any_stored_byte(backend) -> None:
    memory = _secret_memory()
    repo = Repository.init(backend, password=TEST_PASSWORD, **SMALL_REPO)
    first = _snapshot(repo, memory)
    changed = memory.copy()
    changed[:4096 * 8] = np.frombuffer(os.urandom(4096 * 8), np.uint8)
    _snapshot(repo, changed, parent=first.id)
    plain_ids, _ = pagehash.hash_pages(np.concatenate([memory, changed]))  # what a bucket reader could test
    needles = page_words(np.concatenate([memory, changed]), plain_ids[plain_ids.any(axis=1)])
    assert words_found(repo.store, needles) == 0
    assert b"TLS session key" not in b"".join(repo.store.get(k) for k in object_listing(repo.store))
    assert read_all(Repository.open(backend, password=TEST_PASSWORD).get_snapshot(first.id), "ram0") \
        == memory.tobytes()


def test_the_search_finds_pages_of_an_unencrypted_repository(tmp_path) -> None:
    """The control for the test above: the same search does see an unencrypted guest."""
    memory = _secret_memory()
    repo = Repository.init(open_backend(str(tmp_path / "repo")), **SMALL_REPO)
    _snapshot(repo, memory)
    ids, _ = pagehash.hash_pages(memory)
    needles = page_words(memory, ids[ids.any(axis=1)])
    assert words_found(repo.store, needles) > len(needles) // 4


def test_encrypted_ids_are_keyed(tmp_path) -> None:
    """The same page has another id in each encrypted repository, and not its SHA-256."""
    page = np.frombuffer(os.urandom(4096), np.uint8)
    ids = []
    for name in ("a", "b"):
        repo = Repository.init(open_backend(str(tmp_path / name)), password=TEST_PASSWORD)
        ids.append(pagehash.hash_pages(page, repo.crypto.id_key)[0][0].tobytes())
        assert ids[-1] == repo.crypto.object_id(page.tobytes())  # the C helper agrees with hmac
    assert ids[0] != ids[1] and hashlib.sha256(page.tobytes()).digest() not in ids


def test_keyed_ids_without_the_c_helper_match(monkeypatch) -> None:
    data = np.frombuffer(os.urandom(4096 * 5), np.uint8).copy()
    data[4096:8192] = 0
    key = os.urandom(32)
    native = pagehash.hash_pages(data, key)
    monkeypatch.setattr(pagehash, "_lib", False)
    fallback = pagehash.hash_pages(data, key)
    assert (native[0] == fallback[0]).all() and (native[1] == fallback[1]).all()
    assert pagehash.check_slots(data, np.arange(5), native[0], key) == 1  # the zero page's id is zero


def test_dedup_within_an_encrypted_repository(repo) -> None:
    memory = _secret_memory()
    _snapshot(repo, memory, "vm1")
    with repo.start_snapshot() as writer:
        writer.put_region("ram0", memory.nbytes, memory)
        writer.commit("vm2")
        assert writer.stats["pages_new"] == 0 and writer.stats["pages_dedup"] > 0


# -- passwords and keys -------------------------------------------------------------------

@pytest.fixture
def encrypted(tmp_path):
    url = str(tmp_path / "repo")
    repo = Repository.init(open_backend(url), password=TEST_PASSWORD, **SMALL_REPO)
    info = _snapshot(repo, _secret_memory(64))
    return url, info.id


def test_wrong_password_is_refused_and_changes_nothing(encrypted) -> None:
    url, _ = encrypted
    before = object_listing(open_backend(url))
    with pytest.raises(WrongPassword, match=f"no key in file://{url} opens with this password.*nothing was changed"):
        Repository.open_url(url, password="not it")
    assert object_listing(open_backend(url)) == before


def test_no_password_source_names_the_three_ways(encrypted, monkeypatch) -> None:
    url, _ = encrypted
    monkeypatch.delenv("SNAPVISOR_PASSWORD_FILE", raising=False)
    monkeypatch.delenv("SNAPVISOR_PASSWORD_COMMAND", raising=False)
    with pytest.raises(PasswordNeeded, match="--password-file FILE, SNAPVISOR_PASSWORD_FILE=FILE, or "
                                             "SNAPVISOR_PASSWORD_COMMAND"):
        Repository.open_url(url)


@pytest.mark.parametrize("source", ["file", "file-crlf", "command", "env-file", "env-command", "given"])
def test_each_password_source_opens(encrypted, source, tmp_path, monkeypatch) -> None:
    url, snapshot_id = encrypted
    monkeypatch.delenv("SNAPVISOR_PASSWORD_FILE", raising=False)
    monkeypatch.delenv("SNAPVISOR_PASSWORD_COMMAND", raising=False)
    path = tmp_path / "password"
    path.write_bytes(TEST_PASSWORD.encode() + (b"\r\n" if source == "file-crlf" else b"\n"))
    command = f"cat {path}"
    password = {"file": PasswordSource.file(path), "file-crlf": PasswordSource.file(path),
                "command": PasswordSource.command(command), "given": TEST_PASSWORD}.get(source)
    if source == "env-file":
        monkeypatch.setenv("SNAPVISOR_PASSWORD_FILE", str(path))
    if source == "env-command":
        monkeypatch.setenv("SNAPVISOR_PASSWORD_COMMAND", command)
    repo = Repository.open_url(url, password=password)
    assert repo.encrypted and repo.resolve(snapshot_id[:8]) == snapshot_id


@pytest.mark.parametrize("problem", ["missing-file", "empty-file", "failing-command", "unknown-command", "both-env"])
def test_bad_password_sources_are_clear(encrypted, problem, tmp_path, monkeypatch) -> None:
    url, _ = encrypted
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    source = {"missing-file": PasswordSource.file(tmp_path / "nope"), "empty-file": PasswordSource.file(empty),
              "failing-command": PasswordSource.command("sh -c 'echo locked >&2; exit 7'"),
              "unknown-command": PasswordSource.command("no-such-password-tool")}.get(problem)
    if problem == "both-env":
        monkeypatch.setenv("SNAPVISOR_PASSWORD_FILE", str(empty))
        monkeypatch.setenv("SNAPVISOR_PASSWORD_COMMAND", "true")
    message = {"missing-file": "cannot read the password file", "empty-file": "gives an empty password",
               "failing-command": "failed with exit status 7: locked", "unknown-command": "did not run",
               "both-env": "both SNAPVISOR_PASSWORD_FILE and SNAPVISOR_PASSWORD_COMMAND"}[problem]
    with pytest.raises(PasswordSourceError, match=message):
        Repository.open_url(url, password=source)


def test_a_resolved_source_needs_its_file_no_more(encrypted, tmp_path) -> None:
    """What `snapvisor run` does at start: the file may go afterwards."""
    url, _ = encrypted
    path = tmp_path / "password"
    path.write_text(TEST_PASSWORD)
    source = PasswordSource.file(path).resolved()
    path.unlink()
    assert Repository.open_url(url, password=source).encrypted
    assert source.describe() == f"password file {path} (read at start)"


def test_password_source_repr_hides_the_password() -> None:
    assert TEST_PASSWORD not in repr(PasswordSource.given(TEST_PASSWORD))
    assert TEST_PASSWORD not in repr(PasswordSource.given(TEST_PASSWORD).resolved())


def test_key_add_remove_passwd(encrypted) -> None:
    url, snapshot_id = encrypted
    repo = Repository.open_url(url, password=TEST_PASSWORD)
    first = repo.key_id
    second = repo.add_key("second password")
    assert {k.id for k in repo.keys()} == {first, second}
    assert [k.current for k in repo.keys() if k.id == first] == [True]
    with pytest.raises(KeyFileError, match="the one this command opened the repository with"):
        repo.remove_key(first[:6])
    other = Repository.open_url(url, password="second password")
    assert other.key_id == second and other.resolve(snapshot_id) == snapshot_id
    assert other.remove_key(first[:6]) == first
    with pytest.raises(WrongPassword):
        Repository.open_url(url, password=TEST_PASSWORD)
    with pytest.raises(KeyFileError, match="last key"):
        other.remove_key(second)
    third = other.change_password("third password")
    assert [k.id for k in other.keys()] == [third]
    with pytest.raises(WrongPassword):
        Repository.open_url(url, password="second password")
    reopened = Repository.open_url(url, password="third password")
    assert read_all(reopened.get_snapshot(snapshot_id), "ram0") == _secret_memory(64).tobytes()
    with pytest.raises(KeyFileError, match="no key file .* matches"):
        reopened.remove_key("ffffffffffff")


def test_key_verbs_refuse_an_unencrypted_repository(tmp_path) -> None:
    repo = Repository.init(open_backend(str(tmp_path / "plain")))
    with pytest.raises(KeyFileError, match="not encrypted"):
        repo.keys()


def test_key_file_of_another_repository(encrypted, tmp_path) -> None:
    url, _ = encrypted
    other = Repository.init(open_backend(str(tmp_path / "other")), password=TEST_PASSWORD)
    store = open_backend(url)
    [own] = [info.key for info in store.list(KEY_PREFIX)]
    store.delete(own)
    store.put(KEY_PREFIX + other.key_id, other.store.get(KEY_PREFIX + other.key_id))
    with pytest.raises(KeyFileError, match=f"belong to another repository.*{other.config['id']}"):
        Repository.open_url(url, password=TEST_PASSWORD)


def test_missing_keys_folder(encrypted) -> None:
    url, _ = encrypted
    store = open_backend(url)
    for info in list(store.list(KEY_PREFIX)):
        store.delete(info.key)
    with pytest.raises(KeyFileError, match="no key files .*copy keys/ back"):
        Repository.open_url(url, password=TEST_PASSWORD)


def test_config_tells_encryption_in_the_clear_and_seals_the_rest(encrypted) -> None:
    url, _ = encrypted
    config = json.loads(open_backend(url).get(fmt.CONFIG_KEY))
    assert config["encryption"] == {"cipher": "aes-256-gcm", "ids": "hmac-sha256"}
    assert set(config) == {"kind", "format", "id", "encryption", "sealed"}


def test_a_frame_moved_to_another_place_fails_authentication(tmp_path) -> None:
    """Seals are bound to their pack and frame number: swapping two frames of equal
    length (same kind, same size) is detected, where a checksum alone would not."""
    url = str(tmp_path / "repo")
    repo = Repository.init(open_backend(url), password=TEST_PASSWORD, **SMALL_REPO)
    # Random pages: every frame of 16 is stored raw, all of the same length.
    snapshot_id = _snapshot(repo, np.frombuffer(os.urandom(64 * 4096), np.uint8)).id
    index = repo.refresh_index(full=True)
    for pack in index.packs:
        frames = pack.frames
        same = [i for i in range(len(frames)) if frames[i]["clen"] == frames[0]["clen"]]
        if len(same) > 1:
            break
    else:
        pytest.fail("no pack with two frames of the same stored length")
    a, b = same[0], same[1]
    data = bytearray(repo.store.get(pack.key))
    sa = slice(int(frames[a]["offset"]), int(frames[a]["offset"] + frames[a]["clen"]))
    sb = slice(int(frames[b]["offset"]), int(frames[b]["offset"] + frames[b]["clen"]))
    data[sa], data[sb] = bytes(data[sb]), bytes(data[sa])
    repo.store.delete(pack.key)
    repo.store.put(pack.key, bytes(data))
    report = Repository.open_url(url, password=TEST_PASSWORD).verify(read_data=True)
    assert not report.ok and any(f"frame {a} of {pack.key} fails authentication" in e for e in report.errors), \
        report.errors
    assert report.damaged_snapshots == [snapshot_id]


def test_locks_and_index_cache_hold_nothing_in_the_clear(encrypted, monkeypatch, tmp_path) -> None:
    url, _ = encrypted
    monkeypatch.setenv("SNAPVISOR_CACHE", str(tmp_path / "cache"))
    repo = Repository.open_url(url, password=TEST_PASSWORD)
    with repo.start_snapshot():
        [lock] = [info.key for info in repo.store.list(fmt.LOCK_PREFIX)]
        body = repo.store.get(lock)
        assert b"snapshot" not in body and str(os.getpid()).encode() not in body
        assert repo.locks.holders()[0].pid == os.getpid()
    repo.refresh_index()
    # The cache holds the index files as stored: sealed, nothing the bucket does not show.
    stored = {repo.store.get(info.key) for info in repo.store.list(fmt.INDEX_PREFIX)}
    cached = [path.read_bytes() for path in (tmp_path / "cache" / "index").rglob("*") if path.is_file()]
    assert cached and all(data in stored for data in cached)


def test_sealed_index_cache_serves_the_next_open(encrypted, monkeypatch, tmp_path) -> None:
    """A second open on this host reads no index file from the repository; a damaged
    cached copy is dropped and fetched again."""
    url, snapshot_id = encrypted
    monkeypatch.setenv("SNAPVISOR_CACHE", str(tmp_path / "cache"))
    Repository.open_url(url, password=TEST_PASSWORD).refresh_index()
    [copy] = [path for path in (tmp_path / "cache" / "index").rglob("sealed")]
    store = open_backend(url)
    gets = []
    original = store.get
    monkeypatch.setattr(store, "get", lambda key, *a, **k: gets.append(key) or original(key, *a, **k))
    repo = Repository.open(store, password=TEST_PASSWORD)
    assert read_all(repo.get_snapshot(snapshot_id), "ram0") == _secret_memory(64).tobytes()
    assert not [key for key in gets if key.startswith(fmt.INDEX_PREFIX)]
    damaged = bytearray(copy.read_bytes())
    damaged[-3] ^= 1
    copy.write_bytes(bytes(damaged))
    again = Repository.open(store, password=TEST_PASSWORD)
    assert read_all(again.get_snapshot(snapshot_id), "ram0") == _secret_memory(64).tobytes()
    assert [key for key in gets if key.startswith(fmt.INDEX_PREFIX)]  # fetched again
    assert copy.read_bytes() == original(next(iter(store.list(fmt.INDEX_PREFIX))).key)


def test_master_key_round_trip() -> None:
    key = Encryption.generate()
    again = Encryption.from_bytes(key.to_bytes())
    assert again.unseal(key.seal(b"x", "ctx"), "ctx") == b"x"
    with pytest.raises(ValueError, match="ctx fails authentication"):
        again.unseal(key.seal(b"x", "other"), "ctx")
    with pytest.raises(ValueError, match="too short"):
        again.unseal(b"short", "ctx")


def test_init_refuses_an_existing_repository_and_writes_no_key(encrypted) -> None:
    url, _ = encrypted
    store = open_backend(url)
    keys_before = {info.key for info in store.list(KEY_PREFIX)}
    with pytest.raises(RepositoryError, match="already exists"):
        Repository.init(store, password="another")
    assert {info.key for info in store.list(KEY_PREFIX)} == keys_before
