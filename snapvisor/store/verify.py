"""verify: check the repository's structure, and with read_data every stored byte."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from snapvisor.store import codec, pagehash
from snapvisor.store import format as fmt
from snapvisor.store.errors import CorruptObject, ObjectNotFound, SnapvisorError
from snapvisor.store.index import Index
from snapvisor.store.pagehash import ID_SIZE
from snapvisor.store.reachability import referenced_ids
from snapvisor.store.reader import current_progress

if TYPE_CHECKING:
    from snapvisor.store.repository import Repository


@dataclass
class VerifyReport:
    ok: bool
    errors: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    damaged_snapshots: list[str] = field(default_factory=list)  # ids of those that cannot be restored


def verify_repository(repo: "Repository", read_data: bool) -> VerifyReport:
    store = repo.store
    errors: list[str] = []
    counts = {"snapshots": 0, "index_files": 0, "packs": 0, "unindexed_packs": 0,
              "objects_referenced": 0, "frames_read": 0, "bytes_read": 0}

    # Index files one by one, so that one bad file does not hide the others.
    index = Index()
    for info in sorted(store.list(fmt.INDEX_PREFIX), key=lambda i: i.key):
        try:
            index.add_file(info.key, fmt.decode_index(info.key, store.get(info.key), repo.crypto))
            counts["index_files"] += 1
        except CorruptObject as e:
            index.damaged[info.key] = e.problem  # look-ups that needed it say so
            errors.append(f"index file {info.key} is damaged ({e.problem}); run `snapvisor repair-index`, "
                          f"which indexes its packs again")
        except (SnapvisorError, ObjectNotFound) as e:
            errors.append(str(e))
    repo._index, repo._index_stale = index, False
    counts["packs"] = len(index.packs)

    on_disk = {info.key: info.size for info in store.list(fmt.DATA_PREFIX)}
    usable = set()
    for number, pack in enumerate(index.packs):
        size = on_disk.get(pack.key)
        if size is None:
            errors.append(f"pack {pack.key} is missing (listed by {pack.index_key})")
        elif size != pack.size:
            errors.append(f"pack {pack.key} has {size} bytes, its index {pack.index_key} says "
                          f"{pack.size} (truncated or replaced)")
        else:
            usable.add(number)
    indexed = {pack.key for pack in index.packs}
    counts["unindexed_packs"] = sum(1 for k in on_disk if k not in indexed)

    manifests, unreadable = repo.read_manifests()
    errors += [unreadable[i] for i in sorted(unreadable)]
    counts["snapshots"] = len(manifests) + len(unreadable)

    # Objects found damaged by reading them (read_data): each snapshot that needs one is named.
    damaged_ids: set[bytes] = set()
    if read_data:
        expected: dict[int, list[tuple[int, int, bytes]]] = {}
        for oid, (p, fr, slot) in index.entries.items():
            expected.setdefault(p, []).append((fr, slot, oid))

        progress = current_progress()
        progress.start(sum(index.packs[number].size for number in usable))

        def check_pack(number: int) -> tuple[list[str], set[bytes], int, int]:
            checked = _check_pack(repo, index, number, expected.get(number, []))
            progress.advance(index.packs[number].size)
            return checked

        with ThreadPoolExecutor(max_workers=repo.threads) as pool:
            for errs, bad_ids, frames, nbytes in pool.map(check_pack, sorted(usable)):
                errors += errs
                damaged_ids |= bad_ids
                counts["frames_read"] += frames
                counts["bytes_read"] += nbytes

    damaged_snapshots: list[str] = sorted(unreadable)
    for m in manifests:
        name = f"snapshot {m.info.id} ({m.info.vm}, {m.info.time:%Y-%m-%d %H:%M:%S} UTC)"
        try:
            live = referenced_ids(repo, [m])
        except SnapvisorError as e:
            errors.append(f"{name} cannot be restored: {e}")
            damaged_snapshots.append(m.info.id)
            continue
        counts["objects_referenced"] += len(live)
        problems = []
        missing = [oid for oid in live if oid not in index]
        if missing:
            problems.append(f"{len(missing)} referenced objects are in no index file, e.g. {missing[0].hex()}"
                            + ("; run `snapvisor repair-index`" if index.damaged or counts["unindexed_packs"] else ""))
        lost = {index.packs[index.entries[oid][0]].key for oid in live
                if oid in index and index.entries[oid][0] not in usable}
        if lost:
            problems.append(f"it uses damaged or missing packs: {', '.join(sorted(lost))}")
        bad = live & damaged_ids
        if bad:
            packs = sorted({index.packs[index.entries[oid][0]].key for oid in bad})
            problems.append(f"it needs {len(bad)} damaged object(s) in {', '.join(packs)}")
        if problems:
            errors.append(f"{name} cannot be restored: {'; '.join(problems)}")
            damaged_snapshots.append(m.info.id)
    counts["snapshots_damaged"] = len(damaged_snapshots)
    return VerifyReport(not errors, errors, counts, damaged_snapshots)


def _check_pack(repo: "Repository", index: Index, number: int, expected: list[tuple[int, int, bytes]]
                ) -> tuple[list[str], set[bytes], int, int]:
    """(errors, ids of the damaged objects, frames read, bytes read) of one pack."""
    pack = index.packs[number]
    everything = {oid for _, _, oid in expected}
    try:
        data = repo.store.get(pack.key)
        frames = fmt.decode_pack_trailer(pack.key, data, repo.crypto)
    except SnapvisorError as e:
        return [str(e)], everything, 0, 0
    if frames.tobytes() != pack.frames.tobytes():
        return ([f"pack {pack.key}: frame table differs from its index {pack.index_key}"], everything, 0,
                len(data))
    errors: list[str] = []
    damaged: set[bytes] = set()
    by_frame: dict[int, list[tuple[int, bytes]]] = {}
    for fr, slot, oid in expected:
        by_frame.setdefault(fr, []).append((slot, oid))
    for fno, f in enumerate(frames):
        items = sorted(by_frame.get(fno, []))
        try:
            raw = codec.decompress_frame(f, data, 0, fno, repo.crypto, pack.key)
        except ValueError as e:
            errors.append(f"pack {pack.key}: {e}")
            damaged.update(oid for _, oid in items)
            continue
        if int(f["kind"]) == fmt.KIND_PAGES:
            for slot, oid in _bad_slots(raw, items, repo.crypto.id_key):
                errors.append(f"pack {pack.key}: frame {fno} slot {slot} does not hash to its id {oid.hex()}")
                damaged.add(oid)
        else:
            for _, oid in items:
                if repo.crypto.object_id(raw) != oid:
                    errors.append(f"pack {pack.key}: frame {fno} does not hash to its id "
                                  f"{oid.hex()}")
                    damaged.add(oid)
    return errors, damaged, len(frames), len(data)


def _bad_slots(raw: bytes, items: list[tuple[int, bytes]], id_key: bytes | None) -> list[tuple[int, bytes]]:
    """The (slot, id) of `items` whose page in the frame `raw` does not hash to its id."""
    bad: list[tuple[int, bytes]] = []
    while items:
        slots = np.array([s for s, _ in items], dtype=np.uint32)
        ids = np.frombuffer(b"".join(o for _, o in items), np.uint8).reshape(-1, ID_SIZE)
        first = pagehash.check_slots(raw, slots, ids, id_key)  # the first mismatch only: go on past it
        if first < 0:
            break
        bad.append(items[first])
        items = items[first + 1:]
    return bad

