"""Snapshot manifests: the root object of one snapshot, JSON, named by its SHA-256."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

from snapvisor.store import format as fmt
from snapvisor.store.crypto import NoEncryption
from snapvisor.store.errors import CorruptObject, RepositoryError

MANIFEST_KIND = "snapvisor-snapshot"
_NAME = re.compile(r"^[A-Za-z0-9_.:@+-]{1,128}$")


@dataclass(frozen=True)
class RegionRef:
    size: int
    root: bytes  # region root id; ZERO_ID when every page is zero


@dataclass
class SnapshotInfo:
    id: str
    time: datetime
    vm: str
    tags: list[str]
    parent: str | None
    meta: dict
    regions: dict[str, int]
    blobs: list[str] = field(default_factory=list)

    @property
    def short_id(self) -> str:
        return self.id[:12]


@dataclass
class Manifest:
    info: SnapshotInfo
    map_block_pages: int
    region_refs: dict[str, RegionRef]
    blob_ids: dict[str, bytes]


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RepositoryError(f"{kind} name {name!r} is invalid: use 1-128 characters of "
                              f"letters, digits and _ . : @ + -")
    return name


def encode_manifest(*, vm: str, time: datetime, tags: list[str], parent: str | None, meta: dict,
                    map_block_pages: int, regions: dict[str, RegionRef],
                    blobs: dict[str, bytes]) -> bytes:
    obj = {
        "kind": MANIFEST_KIND,
        "format": fmt.FORMAT_VERSION,
        "vm": vm,
        "time": time.astimezone(timezone.utc).isoformat(),
        "tags": list(tags),
        "parent": parent,
        "meta": meta,
        "page_size": fmt.PAGE_SIZE,
        "map_block_pages": map_block_pages,
        "regions": {name: {"size": ref.size, "root": ref.root.hex()}
                    for name, ref in sorted(regions.items())},
        "blobs": {name: oid.hex() for name, oid in sorted(blobs.items())},
    }
    return fmt.canonical_json(obj)


def snapshot_key(snapshot_id: str) -> str:
    return fmt.SNAPSHOT_PREFIX + snapshot_id


def decode_manifest(key: str, data: bytes, crypto: NoEncryption) -> Manifest:
    """A manifest's stored bytes hash to its name (the snapshot id), then are unsealed."""
    snapshot_id = key[len(fmt.SNAPSHOT_PREFIX):]
    if fmt.sha256(data).hex() != snapshot_id:
        raise CorruptObject(key, "content does not match its name (hash mismatch)")
    data = fmt.unseal_object(crypto, key, data, fmt.MANIFEST_CONTEXT)
    obj = fmt.decode_json(key, data, MANIFEST_KIND)
    try:
        if obj["page_size"] != fmt.PAGE_SIZE:
            raise CorruptObject(key, f"page size {obj['page_size']} is not {fmt.PAGE_SIZE}")
        block_pages = obj["map_block_pages"]
        if not isinstance(block_pages, int) or not 1 <= block_pages <= 1 << 20:
            raise CorruptObject(key, "map_block_pages out of range")
        time = datetime.fromisoformat(obj["time"])
        regions = {}
        for name, ref in obj["regions"].items():
            size = ref["size"]
            if not isinstance(size, int) or size < 0 or size % fmt.PAGE_SIZE:
                raise CorruptObject(key, f"region {name!r} has an invalid size {size!r}")
            regions[name] = RegionRef(size, fmt.hex_id(key, ref["root"], f"regions.{name}.root"))
        blobs = {name: fmt.hex_id(key, oid, f"blobs.{name}") for name, oid in obj["blobs"].items()}
        parent = obj["parent"]
        if parent is not None:
            fmt.hex_id(key, parent, "parent")
        tags = obj["tags"]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise CorruptObject(key, "tags must be a list of strings")
        vm = obj["vm"]
        if not isinstance(vm, str) or not isinstance(obj["meta"], dict):
            raise CorruptObject(key, "vm must be a string and meta an object")
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CorruptObject(key, f"manifest field missing or malformed ({e!r})") from None
    info = SnapshotInfo(snapshot_id, time, vm, tags, parent, obj["meta"],
                        {n: r.size for n, r in regions.items()}, sorted(blobs))
    return Manifest(info, block_pages, regions, blobs)
