"""Damaged repositories: each failure is a clear error naming the object, and changes nothing."""

import json

import numpy as np
import pytest

from snapvisor.store import PAGE_SIZE, CorruptObject, RepositoryError
from snapvisor.store import format as fmt
from snapvisor.store.manifest import snapshot_key

from store_helpers import make_memory, object_listing, read_all


def replace(store, key, data):
    """Overwrite an object the way a bad disk or a bad actor would."""
    store.delete(key)
    store.put(key, data)


def snapshot_with_data(repo, seed=0):
    mem = make_memory(96, seed=seed)
    with repo.start_snapshot() as w:
        w.put_region("ram0", mem.nbytes, mem)
        w.put_blob("state", b"device state" * 10)
        info = w.commit("vm1")
    return info, mem


def page_packs(repo):
    """Keys of packs holding page frames."""
    index = repo.refresh_index(full=True)
    return sorted({p.key for p in index.packs if (p.frames["kind"] == fmt.KIND_PAGES).any()})


def test_flipped_byte_in_pack(repo):
    info, mem = snapshot_with_data(repo)
    key = page_packs(repo)[0]
    data = bytearray(repo.store.get(key))
    frames = fmt.decode_pack_trailer(key, bytes(data), repo.crypto)
    victim = frames[frames["kind"] == fmt.KIND_PAGES][0]
    data[int(victim["offset"]) + int(victim["clen"]) // 2] ^= 0x40
    replace(repo.store, key, bytes(data))
    before = object_listing(repo.store)

    with pytest.raises(CorruptObject, match=key):
        read_all(repo.get_snapshot(info.id), "ram0")
    report = repo.verify(read_data=True)
    assert not report.ok and any(key in e for e in report.errors)
    assert repo.verify(read_data=False).ok  # structure alone cannot see it
    assert object_listing(repo.store) == before


def test_truncated_pack(repo):
    info, _ = snapshot_with_data(repo, seed=1)
    key = page_packs(repo)[-1]
    data = repo.store.get(key)
    replace(repo.store, key, data[:len(data) // 3])
    before = object_listing(repo.store)
    with pytest.raises(RepositoryError, match=key):
        read_all(repo.get_snapshot(info.id), "ram0")
    report = repo.verify()
    assert not report.ok and any(key in e and "index" in e for e in report.errors)
    assert object_listing(repo.store) == before


def test_missing_pack(repo):
    info, _ = snapshot_with_data(repo, seed=2)
    key = page_packs(repo)[0]
    repo.store.delete(key)
    before = object_listing(repo.store)
    with pytest.raises(RepositoryError, match=f"pack {key} is missing"):
        read_all(repo.get_snapshot(info.id), "ram0")
    report = repo.verify()
    assert any(f"pack {key} is missing" in e for e in report.errors)
    assert any(info.id in e for e in report.errors)  # names the snapshot that lost data
    with pytest.raises(RepositoryError, match="missing"):
        repo.gc()  # gc refuses to run on a damaged repository
    assert object_listing(repo.store) == before


def test_missing_index(repo):
    info, _ = snapshot_with_data(repo, seed=3)
    for obj in list(repo.store.list(fmt.INDEX_PREFIX)):
        repo.store.delete(obj.key)
    repo.refresh_index(full=True)
    before = object_listing(repo.store)
    with pytest.raises(RepositoryError, match="not in the repository index"):
        read_all(repo.get_snapshot(info.id), "ram0")
    report = repo.verify()
    assert not report.ok and any(info.id in e and "not in the repository index" in e
                                 for e in report.errors)
    assert report.counts["unindexed_packs"] > 0
    with pytest.raises(RepositoryError, match="nothing deleted"):
        repo.gc()
    assert object_listing(repo.store) == before


def test_damaged_index_file(repo):
    snapshot_with_data(repo, seed=4)
    key = next(iter(repo.store.list(fmt.INDEX_PREFIX))).key
    data = bytearray(repo.store.get(key))
    data[-5] ^= 1
    replace(repo.store, key, bytes(data))
    index = repo.refresh_index(full=True)  # the other index files still serve (none here)
    assert list(index.damaged) == [key]
    assert any(key in e for e in repo.verify().errors)


def test_manifest_of_unknown_format_version(repo):
    info, _ = snapshot_with_data(repo, seed=5)
    obj = json.loads(repo.crypto.unseal(repo.store.get(snapshot_key(info.id)), fmt.MANIFEST_CONTEXT))
    obj["format"] = 99
    data = repo.crypto.seal(fmt.canonical_json(obj), fmt.MANIFEST_CONTEXT)  # a valid object of a newer release
    future_id = fmt.sha256(data).hex()
    repo.store.put(snapshot_key(future_id), data)
    before = object_listing(repo.store)
    with pytest.raises(RepositoryError, match=f"{future_id}.*format version 99"):
        repo.get_snapshot(future_id)
    assert read_all(repo.get_snapshot(info.id), "ram0")  # the other snapshot still reads
    assert any("format version 99" in e for e in repo.verify().errors)
    assert object_listing(repo.store) == before


def test_manifest_not_matching_its_name(repo):
    info, _ = snapshot_with_data(repo, seed=6)
    key = snapshot_key(info.id)
    obj = json.loads(repo.crypto.unseal(repo.store.get(key), fmt.MANIFEST_CONTEXT))
    obj["vm"] = "someone-else"
    replace(repo.store, key, repo.crypto.seal(fmt.canonical_json(obj), fmt.MANIFEST_CONTEXT))
    with pytest.raises(RepositoryError, match=f"{key} is damaged .*hash mismatch.*snapvisor forget {info.id[:12]}"):
        repo.get_snapshot(info.id)


def test_forged_page_cannot_reach_restore(repo):
    """A raw (incompressible) frame has no codec checksum: the page hash must catch a swap."""
    rng = np.random.default_rng(7)
    mem = np.zeros(32 * 4096, dtype=np.uint8)
    mem[:4096] = rng.integers(0, 256, 4096, dtype=np.uint8)
    with repo.start_snapshot() as w:
        w.put_region("ram0", mem.nbytes, mem)
        info = w.commit("vm1")
    key = page_packs(repo)[0]
    data = bytearray(repo.store.get(key))
    frames = fmt.decode_pack_trailer(key, bytes(data), repo.crypto)
    frame = frames[frames["kind"] == fmt.KIND_PAGES][0]
    assert frame["codec"] == 0  # stored raw: zstd did not shrink it
    start = int(frame["offset"])
    data[start:start + 4096] = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    replace(repo.store, key, bytes(data))
    # Unencrypted: the page id catches it; encrypted: the frame's seal does, first.
    with pytest.raises(CorruptObject, match=f"{key}.*(does not hash|fails authentication)"):
        read_all(repo.get_snapshot(info.id), "ram0")
    with pytest.raises(CorruptObject, match=key):
        repo.get_snapshot(info.id).region_reader("ram0").read_pages_into([0], bytearray(PAGE_SIZE))
