"""Repository behaviour, over every backend: write, dedup, read back, incremental."""

import numpy as np
import pytest

from snapvisor.store import PAGE_SIZE, Repository, RepositoryError

from store_helpers import SMALL_REPO, make_memory, object_listing, read_all

NPAGES = 200


def full_snapshot(repo, mem, vm="vm1", parent=None, **commit):
    with repo.start_snapshot(parent) as w:
        w.put_region("ram0", mem.nbytes, mem)
        info = w.commit(vm, **commit)
    return info, w.stats


def test_full_snapshot_roundtrip(repo):
    mem = make_memory(NPAGES)
    with repo.start_snapshot() as w:
        w.put_region("ram0", mem.nbytes, memoryview(mem))
        w.put_region("ram1", 8 * PAGE_SIZE, bytes(8 * PAGE_SIZE))
        w.put_blob("vcpu0", b"\x01\x02" * 1000)
        info = w.commit("web1", tags=["nightly", "v1"], meta={"format": 1, "cpuid": "abc"})
    snap = repo.get_snapshot(info.id)
    assert snap.info.vm == "web1" and snap.info.tags == ["nightly", "v1"]
    assert snap.info.meta == {"format": 1, "cpuid": "abc"}
    assert snap.regions == {"ram0": mem.nbytes, "ram1": 8 * PAGE_SIZE}
    assert snap.blob_names == ["vcpu0"]
    assert read_all(snap, "ram0") == mem.tobytes()
    assert read_all(snap, "ram1") == bytes(8 * PAGE_SIZE)
    assert snap.get_blob("vcpu0") == b"\x01\x02" * 1000
    pages = mem.reshape(-1, PAGE_SIZE)
    expected_nonzero = np.flatnonzero(pages.any(axis=1))
    assert np.array_equal(snap.region_reader("ram0").nonzero_pages(), expected_nonzero)
    stats = w.stats
    assert stats["pages_zero"] == NPAGES - len(expected_nonzero) + 8
    # Identical 0xAB pages are stored once.
    distinct = len({pages[i].tobytes() for i in expected_nonzero})
    assert stats["pages_new"] == distinct
    assert stats["pages_dedup"] == len(expected_nonzero) - distinct


def test_reads_of_any_range_and_page(repo):
    mem = make_memory(NPAGES, seed=3)
    info, _ = full_snapshot(repo, mem)
    snap = repo.get_snapshot(info.id[:10])
    raw = mem.tobytes()
    for offset, length in [(0, 1), (5, PAGE_SIZE), (PAGE_SIZE - 3, 10), (12345, 3 * PAGE_SIZE + 17),
                           (len(raw) - 100, 100), (0, len(raw))]:
        assert snap.read_region("ram0", offset, length) == raw[offset:offset + length]
    reader = snap.region_reader("ram0")
    for index in (0, 1, 57, NPAGES - 1):
        one = bytearray(PAGE_SIZE)
        reader.read_pages_into([index], one)
        assert one == raw[index * PAGE_SIZE:(index + 1) * PAGE_SIZE]
    wanted = np.array([199, 3, 3, 150, 0])
    out = bytearray(b"\xff" * len(wanted) * PAGE_SIZE)
    reader.read_pages_into(wanted, out)
    assert bytes(out) == b"".join(raw[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in wanted)
    with pytest.raises(RepositoryError, match="outside"):
        snap.read_region("ram0", len(raw) - 1, 2)
    with pytest.raises(RepositoryError, match="no region 'ram9'"):
        snap.region_reader("ram9")


def test_incremental_pages_from_parent(repo):
    mem = make_memory(NPAGES, seed=1)
    base, _ = full_snapshot(repo, mem)
    changed = np.array([2, 3, 40, 41, 42, 199])
    new = mem.copy().reshape(-1, PAGE_SIZE)
    new[changed] = np.random.default_rng(9).integers(0, 256, (len(changed), PAGE_SIZE), np.uint8)
    new[41] = 0  # a page that became zero
    with repo.start_snapshot(base.id) as w:
        # Two pre-copy rounds with disjoint page sets.
        w.put_region("ram0", mem.nbytes, new[changed[:3]].tobytes(), changed[:3])
        w.put_region("ram0", mem.nbytes, new[changed[3:]].tobytes(), changed[3:])
        child = w.commit("vm1")
    assert child.parent == base.id
    assert w.stats["pages_new"] == len(changed) - 1
    assert read_all(repo.get_snapshot(child.id), "ram0") == new.tobytes()
    # The parent is untouched, and the child stands alone once the parent is gone.
    assert read_all(repo.get_snapshot(base.id), "ram0") == mem.tobytes()
    repo.delete_snapshot(base.id)
    repo.gc()
    assert read_all(repo.get_snapshot(child.id), "ram0") == new.tobytes()
    assert repo.verify(read_data=True).ok


def test_incremental_without_parent_region_is_zero(repo):
    with repo.start_snapshot() as w:
        page = np.full(PAGE_SIZE, 7, np.uint8)
        w.put_region("ram0", 16 * PAGE_SIZE, page, np.array([5]))
        info = w.commit("vm1")
    expected = bytearray(16 * PAGE_SIZE)
    expected[5 * PAGE_SIZE:6 * PAGE_SIZE] = page.tobytes()
    assert read_all(repo.get_snapshot(info.id), "ram0") == bytes(expected)


def test_unchanged_snapshot_costs_almost_nothing(repo):
    mem = make_memory(NPAGES, seed=2)
    first, s1 = full_snapshot(repo, mem)
    second, s2 = full_snapshot(repo, mem, parent=first.id)
    assert s2["pages_new"] == 0 and s2["map_blocks_new"] == 0
    assert s2["bytes_written"] < 2000 < s1["bytes_written"]  # just the manifest
    with repo.start_snapshot(second.id) as w:  # incremental with an empty dirty set
        w.put_region("ram0", mem.nbytes, b"", np.array([], dtype=np.int64))
        third = w.commit("vm1")
    assert w.stats["bytes_written"] < 2000
    assert read_all(repo.get_snapshot(third.id), "ram0") == mem.tobytes()


def test_clone_of_same_image_dedups_across_vms(repo):
    mem = make_memory(NPAGES, seed=4)
    _, s1 = full_snapshot(repo, mem, vm="vm-a")
    clone = mem.copy().reshape(-1, PAGE_SIZE)
    clone[7] = 1  # the clone diverged by one page
    info, s2 = full_snapshot(repo, clone.reshape(-1), vm="vm-b")
    assert s2["pages_new"] == 1
    assert s2["bytes_written"] < 0.1 * s1["bytes_written"]
    assert read_all(repo.get_snapshot(info.id), "ram0") == clone.tobytes()


def test_list_and_resolve(repo):
    mem = make_memory(32)
    a, _ = full_snapshot(repo, mem, vm="a")
    b, _ = full_snapshot(repo, mem, vm="b", tags=["t"])
    listed = repo.list_snapshots()
    assert [s.id for s in listed] == [a.id, b.id]
    assert listed[1].tags == ["t"] and listed[1].regions == {"ram0": mem.nbytes}
    assert listed[0].time <= listed[1].time and listed[0].time.tzinfo is not None
    absent = next(p for p in "0123456789abcdef" if not a.id.startswith(p) and not b.id.startswith(p))
    with pytest.raises(RepositoryError, match="no snapshot"):
        repo.get_snapshot(absent * 64)
    with pytest.raises(RepositoryError, match="not a snapshot id"):
        repo.get_snapshot("../config")
    # Snapshot ids are hashes: add snapshots until two share a first hex digit.
    ids = [a.id, b.id]
    while len({i[0] for i in ids}) == len(ids):
        ids.append(full_snapshot(repo, mem, vm="c")[0].id)
    shared = next(p for p in "0123456789abcdef" if sum(i[0] == p for i in ids) > 1)
    with pytest.raises(RepositoryError, match="ambiguous"):
        repo.get_snapshot(shared)


def test_abort_and_exception_leave_no_snapshot(repo):
    mem = make_memory(64)
    w = repo.start_snapshot()
    w.put_region("ram0", mem.nbytes, mem)
    w.abort()
    with pytest.raises(RuntimeError):
        with repo.start_snapshot() as w2:
            w2.put_region("ram0", mem.nbytes, mem)
            raise RuntimeError("capture failed")
    assert repo.list_snapshots() == []
    with pytest.raises(RepositoryError, match="already committed or aborted"):
        w2.commit("vm1")
    # gc reclaims the packs the aborted writers uploaded.
    repo.gc()
    assert not any(o.key.startswith("data/") for o in repo.store.list(""))


def test_bad_arguments_are_clear_errors(repo):
    mem = make_memory(16)
    with repo.start_snapshot() as w:
        with pytest.raises(RepositoryError, match="multiple of 4096"):
            w.put_region("ram0", 1000, b"x" * 1000)
        with pytest.raises(RepositoryError, match="has 4096 bytes, size is"):
            w.put_region("ram0", 2 * PAGE_SIZE, bytes(PAGE_SIZE))
        with pytest.raises(RepositoryError, match="sorted, unique"):
            w.put_region("ram0", mem.nbytes, bytes(2 * PAGE_SIZE), np.array([3, 1]))
        with pytest.raises(RepositoryError, match="region name"):
            w.put_region("../x", PAGE_SIZE, bytes(PAGE_SIZE))
    base, _ = full_snapshot(repo, mem)
    with repo.start_snapshot(base.id) as w:
        with pytest.raises(RepositoryError, match="parent snapshot .* has it with"):
            w.put_region("ram0", mem.nbytes * 2, bytes(PAGE_SIZE), np.array([0]))
    with repo.start_snapshot() as w:
        w.put_region("ram0", mem.nbytes, mem)
        with pytest.raises(RepositoryError, match="JSON"):
            w.commit("vm1", meta={"x": object()})
        fixed = w.commit("vm1", meta={"x": 1})  # the writer survives a bad meta
    assert [s.id for s in repo.list_snapshots()] == [base.id, fixed.id]


def test_init_open_errors(backend):
    with pytest.raises(RepositoryError, match="no snapvisor repository.*create it with .snapvisor init"):
        Repository.open(backend)
    Repository.init(backend, **SMALL_REPO)
    before = object_listing(backend)
    with pytest.raises(RepositoryError, match="already exists"):
        Repository.init(backend)
    assert object_listing(backend) == before
    assert Repository.open(backend).pack_size == SMALL_REPO["pack_size"]


def test_open_url_create(tmp_path):
    url = f"file://{tmp_path}/r"
    repo = Repository.open_url(url, create=True)
    assert Repository.open_url(url).config["id"] == repo.config["id"]
