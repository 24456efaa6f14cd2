"""verify: check the repository's structure, and with read_data every stored byte."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from snapvisor.store import codec, pagehash
from snapvisor.store import format as fmt
from snapvisor.store.errors import ObjectNotFound, SnapvisorError
from snapvisor.store.index import Index
from snapvisor.store.manifest import decode_manifest
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


def verify_repository(repo: "Repository", read_data: bool) -> VerifyReport:
    store = repo.store
    errors: list[str] = []
    counts = {"snapshots": 0, "index_files": 0, "packs": 0, "unindexed_packs": 0,
              "objects_referenced": 0, "frames_read": 0, "bytes_read": 0}

    # Index files one by one, so that one bad file does not hide the others.
    index = Index()
    for info in sorted(store.list(fmt.INDEX_PREFIX), key=lambda i: i.key):
        try:
            index.add_file(info.key, fmt.decode_index(info.key, store.get(info.key)))
            counts["index_files"] += 1
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

    manifests = []
    for info in sorted(store.list(fmt.SNAPSHOT_PREFIX), key=lambda i: i.key):
        try:
            manifests.append(decode_manifest(info.key, store.get(info.key)))
        except (SnapvisorError, ObjectNotFound) as e:
            errors.append(str(e))
    counts["snapshots"] = len(manifests)

    for m in manifests:
        try:
            live = referenced_ids(repo, [m])
        except SnapvisorError as e:
            errors.append(f"snapshot {m.info.id}: {e}")
            continue
        counts["objects_referenced"] += len(live)
        missing = [oid for oid in live if oid not in index]
        if missing:
            errors.append(f"snapshot {m.info.id} ({m.info.vm}): {len(missing)} referenced "
                          f"objects are in no index file, e.g. {missing[0].hex()}")
        lost = {index.packs[index.entries[oid][0]].key for oid in live
                if oid in index and index.entries[oid][0] not in usable}
        if lost:
            errors.append(f"snapshot {m.info.id} ({m.info.vm}) uses damaged or missing packs: "
                          f"{', '.join(sorted(lost))}")

    if read_data:
        expected: dict[int, list[tuple[int, int, bytes]]] = {}
        for oid, (p, fr, slot) in index.entries.items():
            expected.setdefault(p, []).append((fr, slot, oid))

        progress = current_progress()
        progress.start(sum(index.packs[number].size for number in usable))

        def check_pack(number: int) -> tuple[list[str], int, int]:
            checked = _check_pack(repo, index, number, expected.get(number, []))
            progress.advance(index.packs[number].size)
            return checked

        with ThreadPoolExecutor(max_workers=repo.threads) as pool:
            for errs, frames, nbytes in pool.map(check_pack, sorted(usable)):
                errors += errs
                counts["frames_read"] += frames
                counts["bytes_read"] += nbytes
    return VerifyReport(not errors, errors, counts)


def _check_pack(repo: "Repository", index: Index, number: int,
                expected: list[tuple[int, int, bytes]]) -> tuple[list[str], int, int]:
    pack = index.packs[number]
    try:
        data = repo.store.get(pack.key)
        frames = fmt.decode_pack_trailer(pack.key, data)
    except SnapvisorError as e:
        return [str(e)], 0, 0
    if frames.tobytes() != pack.frames.tobytes():
        return [f"pack {pack.key}: frame table differs from its index {pack.index_key}"], 0, len(data)
    errors = []
    by_frame: dict[int, list[tuple[int, bytes]]] = {}
    for fr, slot, oid in expected:
        by_frame.setdefault(fr, []).append((slot, oid))
    for fno, f in enumerate(frames):
        try:
            raw = codec.decompress_frame(f, data, 0, fno)
        except ValueError as e:
            errors.append(f"pack {pack.key}: {e}")
            continue
        items = sorted(by_frame.get(fno, []))
        if int(f["kind"]) == fmt.KIND_PAGES:
            if items:
                slots = np.array([s for s, _ in items], dtype=np.uint32)
                ids = np.frombuffer(b"".join(o for _, o in items), np.uint8).reshape(-1, ID_SIZE)
                bad = pagehash.check_slots(raw, slots, ids)
                if bad >= 0:
                    errors.append(f"pack {pack.key}: frame {fno} slot {int(slots[bad])} does not "
                                  f"hash to its id {ids[bad].tobytes().hex()}")
        else:
            for _, oid in items:
                if fmt.sha256(raw) != oid:
                    errors.append(f"pack {pack.key}: frame {fno} does not hash to its id "
                                  f"{oid.hex()}")
    return errors, len(frames), len(data)

