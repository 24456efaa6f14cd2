"""The local index cache: a second opening of a repository reads its index from
local disk, gives the same answers, and drops copies that are damaged or whose
index file is gone."""

from __future__ import annotations

import numpy as np
import pytest

from snapvisor.store import PAGE_SIZE, Repository, open_backend
from snapvisor.store import format as fmt
from store_helpers import SMALL_REPO, make_memory, read_all

NPAGES = 96


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SNAPVISOR_CACHE", str(root))
    return root


def snapshot(repo: Repository, mem: np.ndarray) -> str:
    with repo.start_snapshot() as writer:
        writer.put_region("ram0", mem.nbytes, mem)
        return writer.commit("vm1").id


def index_reads(store) -> list[str]:
    """Record the index files `store` is asked for from now on."""
    asked: list[str] = []
    get = store.get

    def counting_get(key, *args, **kwargs):
        if key.startswith(fmt.INDEX_PREFIX):
            asked.append(key)
        return get(key, *args, **kwargs)

    store.get = counting_get
    return asked


def test_a_second_opening_reads_the_index_from_the_cache(tmp_path, cache_root):
    url = str(tmp_path / "repo")
    repo = Repository.init(open_backend(url), **SMALL_REPO)
    mem = make_memory(NPAGES, seed=1)
    snapshot_id = snapshot(repo, mem)
    copies = list((cache_root / "index" / repo.config["id"]).iterdir())
    assert [c.name for c in copies] == [k.key[len(fmt.INDEX_PREFIX):] for k in repo.store.list(fmt.INDEX_PREFIX)]

    again = Repository.open(open_backend(url))
    asked = index_reads(again.store)
    assert read_all(again.get_snapshot(snapshot_id), "ram0") == mem.tobytes()
    assert asked == []  # every index file came from the cache
    fresh = again.refresh_index(full=True)  # gc's way: the repository, not the cache
    assert asked and fresh.packs == again.index.packs


def test_a_damaged_copy_is_dropped_and_fetched_again(tmp_path, cache_root):
    url = str(tmp_path / "repo")
    repo = Repository.init(open_backend(url), **SMALL_REPO)
    mem = make_memory(NPAGES, seed=2)
    snapshot_id = snapshot(repo, mem)
    [copy] = (cache_root / "index" / repo.config["id"]).iterdir()
    entries = copy / "entries.npy"
    entries.write_bytes(entries.read_bytes()[:100])  # truncated: a crash while the disk filled up

    again = Repository.open(open_backend(url))
    asked = index_reads(again.store)
    assert read_all(again.get_snapshot(snapshot_id), "ram0") == mem.tobytes()
    assert len(asked) == 1
    assert len(entries.read_bytes()) > 100  # saved again, whole


def test_copies_of_index_files_gc_replaced_are_pruned(tmp_path, cache_root):
    url = str(tmp_path / "repo")
    repo = Repository.init(open_backend(url), **SMALL_REPO)
    first = snapshot(repo, make_memory(NPAGES, seed=3))
    mem = make_memory(NPAGES, seed=4)
    snapshot(repo, mem)
    directory = cache_root / "index" / repo.config["id"]
    before = {c.name for c in directory.iterdir()}
    assert len(before) == 2
    repo.delete_snapshot(first)
    repo.gc()

    again = Repository.open(open_backend(url))
    listed = {k.key[len(fmt.INDEX_PREFIX):] for k in again.store.list(fmt.INDEX_PREFIX)}
    again.index  # noqa: B018 (loading it prunes the cache)
    assert {c.name for c in directory.iterdir()} == listed != before
    [latest] = again.list_snapshots()
    out = bytearray(NPAGES * PAGE_SIZE)
    again.get_snapshot(latest.id).region_reader("ram0").read_into(out)
    assert bytes(out) == mem.tobytes()
