"""The set of object ids that the repository's snapshots reference."""

from __future__ import annotations

from typing import TYPE_CHECKING

from snapvisor.store import format as fmt
from snapvisor.store.manifest import Manifest
from snapvisor.store.pagehash import ID_SIZE, PAGE_SIZE
from snapvisor.store.reader import read_objects

if TYPE_CHECKING:
    from snapvisor.store.repository import Repository


def referenced_ids(repo: "Repository", manifests: list[Manifest]) -> set[bytes]:
    """Every blob, region root, map block and page id reachable from `manifests`.

    Shared map blocks are read once. Raises RepositoryError/CorruptObject when a
    referenced object is missing or damaged.
    """
    live: set[bytes] = set()
    roots: dict[bytes, tuple[int, int, str]] = {}  # root id -> (npages, block pages, what)
    for m in manifests:
        live.update(m.blob_ids.values())
        for name, ref in m.region_refs.items():
            if ref.root != fmt.ZERO_ID:
                roots[ref.root] = (ref.size // PAGE_SIZE, m.map_block_pages,
                                   f"snapshot {m.info.short_id} region {name!r}")
    live.update(roots)
    root_data = read_objects(repo, list(roots), "region root")
    blocks: dict[bytes, int] = {}  # block id -> pages it covers
    for root_id, (npages, block_pages, what) in roots.items():
        nblocks = -(-npages // block_pages)
        ids = fmt.decode_region_root(f"{what} root", root_data[root_id], nblocks).tobytes()
        for b in range(nblocks):
            oid = ids[b * ID_SIZE:(b + 1) * ID_SIZE]
            if oid != fmt.ZERO_ID:
                blocks[oid] = min(block_pages, npages - b * block_pages)
    live.update(blocks)
    block_data = read_objects(repo, list(blocks), "page map block")
    for oid, count in blocks.items():
        page_ids = fmt.decode_map_block(f"map block {oid.hex()}", block_data[oid], count)
        rows = page_ids[page_ids.any(axis=1)].tobytes()
        live.update(rows[i:i + ID_SIZE] for i in range(0, len(rows), ID_SIZE))
    return live
