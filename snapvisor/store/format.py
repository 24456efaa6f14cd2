"""Binary and JSON layouts of repository objects (see docs/format.md).

Every decoder treats its input as untrusted: lengths, counts and versions are
checked before use, and a mismatch raises CorruptObject naming the object.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import zstandard

from snapvisor.store.crypto import NoEncryption
from snapvisor.store.errors import CorruptObject, RepositoryError
from snapvisor.store.pagehash import ID_SIZE, PAGE_SIZE

FORMAT_VERSION = 1
ZERO_ID = bytes(ID_SIZE)

# Object kinds stored as frames in packs.
KIND_PAGES = 0       # a run of whole pages, one slot per page
KIND_MAP_BLOCK = 1   # page ids of one block of a region's page map
KIND_REGION_ROOT = 2  # the map block ids of one region
KIND_BLOB = 3        # small opaque state (vCPU, devices)
KINDS = (KIND_PAGES, KIND_MAP_BLOCK, KIND_REGION_ROOT, KIND_BLOB)

CONFIG_KEY = "config"
SNAPSHOT_PREFIX = "snapshots/"
INDEX_PREFIX = "index/"
DATA_PREFIX = "data/"
LOCK_PREFIX = "locks/"

FRAME_DTYPE = np.dtype([("offset", "<u8"), ("clen", "<u4"), ("rlen", "<u4"),
                        ("items", "<u4"), ("codec", "u1"), ("kind", "u1"), ("reserved", "<u2")])
ENTRY_DTYPE = np.dtype([("id", "V32"), ("pack", "<u4"), ("frame", "<u4"), ("slot", "<u4")])
PACK_RECORD_DTYPE = np.dtype([("pack_id", "V16"), ("size", "<u8"), ("nframes", "<u4")])

PACK_MAGIC = b"SVPK"
INDEX_MAGIC = b"SVIX"
_PACK_FOOTER = struct.Struct("<4sHHII")  # magic, version, reserved, trailer length, crc32
_INDEX_HEADER = struct.Struct("<4sHH")   # magic, version, reserved
COUNT = struct.Struct("<I")


def sha256(data) -> bytes:
    return hashlib.sha256(data).digest()


# What each sealed object is bound to (AEAD associated data), so that bytes moved
# to another object, frame or role do not authenticate (encrypted repositories).
def frame_context(pack_key_: str, number: int) -> str:
    return f"frame {number} of {pack_key_}"


def trailer_context(pack_key_: str) -> str:
    return f"frame table of {pack_key_}"


INDEX_CONTEXT = "index file"
MANIFEST_CONTEXT = "snapshot manifest"


def unseal_object(crypto: NoEncryption, key: str, data, context: str) -> bytes:
    """A whole stored object's plaintext; CorruptObject naming it when it fails
    authentication."""
    try:
        return crypto.unseal(data, context)
    except ValueError as e:
        raise CorruptObject(key, str(e)) from None


def pack_key(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"{DATA_PREFIX}{h[:2]}/{h}"


def pack_id_from_key(key: str) -> bytes | None:
    name = key.rsplit("/", 1)[-1]
    try:
        pid = bytes.fromhex(name)
    except ValueError:
        return None
    return pid if len(pid) == 16 and key == pack_key(pid) else None


# ---- packs -----------------------------------------------------------------

def encode_pack_trailer(frames: np.ndarray, crypto: NoEncryption, key: str) -> bytes:
    body = crypto.seal(zstandard.ZstdCompressor(level=3).compress(frames.tobytes()), trailer_context(key))
    return body + _PACK_FOOTER.pack(PACK_MAGIC, FORMAT_VERSION, 0, len(body), zlib.crc32(body))


def decode_pack_trailer(key: str, pack: bytes, crypto: NoEncryption) -> np.ndarray:
    """The frame table stored at the end of a whole pack, checked against its size."""
    if len(pack) < _PACK_FOOTER.size:
        raise CorruptObject(key, f"pack of {len(pack)} bytes is too short for its footer")
    magic, version, _, tlen, crc = _PACK_FOOTER.unpack_from(pack, len(pack) - _PACK_FOOTER.size)
    if magic != PACK_MAGIC:
        raise CorruptObject(key, "pack footer magic is wrong (truncated or not a pack)")
    if version != FORMAT_VERSION:
        raise CorruptObject(key, f"pack format version {version} is not supported "
                                 f"(this snapvisor reads version {FORMAT_VERSION})")
    end = len(pack) - _PACK_FOOTER.size
    if tlen > end:
        raise CorruptObject(key, "pack trailer length exceeds the pack")
    body = pack[end - tlen:end]
    if zlib.crc32(body) != crc:
        raise CorruptObject(key, "pack trailer checksum mismatch")
    body = unseal_object(crypto, key, body, trailer_context(key))
    try:
        raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=64 << 20)
    except zstandard.ZstdError as e:
        raise CorruptObject(key, f"pack trailer does not decode ({e})") from None
    if len(raw) % FRAME_DTYPE.itemsize:
        raise CorruptObject(key, "pack trailer has a partial frame record")
    frames = np.frombuffer(raw, dtype=FRAME_DTYPE)
    check_frames(key, frames, end - tlen)
    return frames


def check_frames(key: str, frames: np.ndarray, data_end: int) -> None:
    """Frames must lie inside the pack's data area, in order, without overlap."""
    if len(frames) == 0:
        return
    ends = frames["offset"] + frames["clen"]
    if (frames["offset"][1:] < ends[:-1]).any() or int(ends.max()) > data_end:
        raise CorruptObject(key, "frame table points outside the pack or frames overlap")
    if not np.isin(frames["kind"], KINDS).all() or (frames["codec"] > 1).any():
        raise CorruptObject(key, "frame table has an unknown kind or codec")
    pages = frames["kind"] == KIND_PAGES
    if (frames["items"] == 0).any() or (frames["rlen"][pages] != frames["items"][pages].astype(np.uint64) * PAGE_SIZE).any() \
            or (frames["items"][~pages] != 1).any():
        raise CorruptObject(key, "frame table item counts do not match frame sizes")


# ---- index files -----------------------------------------------------------

@dataclass
class IndexFile:
    packs: np.ndarray      # PACK_RECORD_DTYPE
    frames: list[np.ndarray]  # FRAME_DTYPE per pack
    entries: np.ndarray    # ENTRY_DTYPE; entry.pack indexes `packs`


def sorted_entries(index: IndexFile) -> IndexFile:
    """`index` with its entries sorted by id, the order index files are written in."""
    order = np.argsort(id_prefixes(index.entries), kind="stable")
    return IndexFile(index.packs, index.frames, index.entries[order])


def encode_index(index: IndexFile, crypto: NoEncryption) -> bytes:
    # Entries sorted by id, so that readers use the file as a search table as it is.
    entries = sorted_entries(index).entries
    parts = [COUNT.pack(len(index.packs)), index.packs.tobytes()]
    parts += [f.tobytes() for f in index.frames]
    parts += [COUNT.pack(len(entries)), entries.tobytes()]
    body = zstandard.ZstdCompressor(level=3).compress(b"".join(parts))
    return _INDEX_HEADER.pack(INDEX_MAGIC, FORMAT_VERSION, 0) + crypto.seal(body, INDEX_CONTEXT)


def entry_bytes(entries: np.ndarray) -> np.ndarray:
    """Index entries as an (n, itemsize) uint8 array (a view where possible)."""
    return np.ascontiguousarray(entries).view(np.uint8).reshape(len(entries), entries.itemsize)


def id_prefixes(entries: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each entry's id as a little-endian uint64 (the sort key
    of index entries)."""
    return np.ascontiguousarray(entry_bytes(entries)[:, :8]).view("<u8").ravel()


def index_key(data: bytes) -> str:
    """An index file's name: the SHA-256 of its stored (in encrypted repositories,
    sealed) bytes."""
    return INDEX_PREFIX + sha256(data).hex()


def decode_index(key: str, data: bytes, crypto: NoEncryption) -> IndexFile:
    name = key[len(INDEX_PREFIX):]
    if sha256(data).hex() != name:
        raise CorruptObject(key, "content does not match its name (hash mismatch)")
    if len(data) < _INDEX_HEADER.size:
        raise CorruptObject(key, "too short")
    magic, version, _ = _INDEX_HEADER.unpack_from(data)
    if magic != INDEX_MAGIC:
        raise CorruptObject(key, "not an index file (magic)")
    if version != FORMAT_VERSION:
        raise RepositoryError(f"{key} has index format version {version}; this snapvisor reads "
                              f"version {FORMAT_VERSION}: upgrade snapvisor")
    try:
        body = unseal_object(crypto, key, memoryview(data)[_INDEX_HEADER.size:], INDEX_CONTEXT)
        raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 32)
    except zstandard.ZstdError as e:
        raise CorruptObject(key, f"body does not decode ({e})") from None
    try:
        pos = 0
        (npacks,) = COUNT.unpack_from(raw, pos)
        pos += 4
        packs = np.frombuffer(raw, PACK_RECORD_DTYPE, npacks, pos)
        pos += packs.nbytes
        frames = []
        for rec in packs:
            f = np.frombuffer(raw, FRAME_DTYPE, int(rec["nframes"]), pos)
            pos += f.nbytes
            frames.append(f)
        (nentries,) = COUNT.unpack_from(raw, pos)
        pos += 4
        entries = np.frombuffer(raw, ENTRY_DTYPE, nentries, pos)
        pos += entries.nbytes
    except (struct.error, ValueError):
        raise CorruptObject(key, "body is truncated") from None
    if pos != len(raw):
        raise CorruptObject(key, "body has trailing bytes")
    for rec, f in zip(packs, frames):
        check_frames(key, f, int(rec["size"]))
    if len(entries):
        if int(entries["pack"].max()) >= npacks:
            raise CorruptObject(key, "an entry names a pack the file does not list")
        nframes = packs["nframes"][entries["pack"]]
        if (entries["frame"] >= nframes).any():
            raise CorruptObject(key, "an entry names a frame its pack does not have")
        base = np.concatenate(([0], np.cumsum(packs["nframes"].astype(np.int64))[:-1]))
        all_items = np.concatenate([f["items"] for f in frames])
        items = all_items[base[entries["pack"]] + entries["frame"]]
        if (entries["slot"] >= items).any():
            raise CorruptObject(key, "an entry names a slot outside its frame")
    return IndexFile(packs, frames, entries)


# ---- page maps ---------------------------------------------------------------

def decode_map_block(what: str, data: bytes, expected_pages: int) -> np.ndarray:
    """(expected_pages, 32) uint8 page ids, zero rows for zero pages.

    A map block is: u32 page count, a bitmap of the non-zero pages (bit i of byte
    i // 8, least significant first), then the 32-byte ids of the non-zero pages.
    """
    if len(data) < 4:
        raise CorruptObject(what, "map block too short")
    (npages,) = COUNT.unpack_from(data)
    if npages != expected_pages:
        raise CorruptObject(what, f"map block covers {npages} pages, expected {expected_pages}")
    nbitmap = (npages + 7) // 8
    bitmap = np.frombuffer(data, np.uint8, nbitmap, 4) if len(data) >= 4 + nbitmap else None
    if bitmap is None:
        raise CorruptObject(what, "map block bitmap truncated")
    nonzero = np.unpackbits(bitmap, count=npages, bitorder="little").astype(bool)
    count = int(nonzero.sum())
    if len(data) != 4 + nbitmap + count * ID_SIZE:
        raise CorruptObject(what, "map block length does not match its bitmap")
    ids = np.zeros((npages, ID_SIZE), dtype=np.uint8)
    ids[nonzero] = np.frombuffer(data, np.uint8, count * ID_SIZE, 4 + nbitmap).reshape(count, ID_SIZE)
    return ids


def decode_region_root(what: str, data: bytes, nblocks: int) -> np.ndarray:
    if len(data) != nblocks * ID_SIZE:
        raise CorruptObject(what, f"region root has {len(data)} bytes, expected {nblocks} ids")
    return np.frombuffer(data, np.uint8).reshape(nblocks, ID_SIZE)


# ---- manifests and config ------------------------------------------------------

def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def decode_json_object(data: bytes, key: str = CONFIG_KEY) -> dict:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptObject(key, f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CorruptObject(key, "not a JSON object")
    return obj


def decode_json(key: str, data: bytes, kind: str) -> dict:
    obj = decode_json_object(data, key)
    if obj.get("kind") != kind:
        raise CorruptObject(key, f"not a {kind} object")
    version = obj.get("format")
    if version != FORMAT_VERSION:
        raise RepositoryError(f"{key} has format version {version!r}; this snapvisor reads "
                              f"version {FORMAT_VERSION}: use a snapvisor release that supports it")
    return obj


def hex_id(key: str, value, field: str, size: int = ID_SIZE) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != size:
        raise CorruptObject(key, f"field {field!r} is not a {size}-byte hex id")
    return raw
