"""The in-memory union of the repository's index files: object id -> (pack, frame, slot)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from snapvisor.store import format as fmt
from snapvisor.store.backend import ObjectStore
from snapvisor.store.crypto import NoEncryption
from snapvisor.store.errors import CorruptObject, ObjectNotFound, RepositoryError
from snapvisor.store.index_cache import IndexCache


@dataclass
class PackInfo:
    pack_id: bytes
    size: int
    frames: np.ndarray  # FRAME_DTYPE
    index_key: str      # the index file that lists this pack

    @property
    def key(self) -> str:
        return fmt.pack_key(self.pack_id)


Location = tuple[int, int, int]  # (pack number in Index.packs, frame, slot)


# A look-up of at most this many ids (a blob, a region root, the pages of a few map
# blocks) searches the index files one by one instead of first merging them: the
# merge (~10 ms for a full and an incremental snapshot's files) is then done by the
# first large look-up, off a lazy restore's path to the guest's first instruction.
SMALL_QUERY = 4096

# (ids as (n, 4) uint64 words, (n, 3) int64 locations (pack, frame, slot), ids[:, 0]
# contiguous), sorted on ids[:, 0].
Table = tuple[np.ndarray, np.ndarray, np.ndarray]


class Index:
    """Kept as sorted arrays (a restore looks up a whole region's page ids at once,
    at C speed); the dict view `entries`, used for single look-ups while writing,
    verifying and collecting garbage, is built on first use."""

    def __init__(self) -> None:
        self.packs: list[PackInfo] = []
        self.pack_numbers: dict[bytes, int] = {}
        self.files: set[str] = set()
        # Index files that did not decode (key -> why): left out, so that look-ups
        # of everything else still work; an id only they listed is "not indexed".
        self.damaged: dict[str, str] = {}
        self._tables: list[Table] = []  # one per index file
        self._merged: Table | None = None  # all files in one table, built on first large look-up
        self._entries: dict[bytes, Location] | None = None

    @property
    def entries(self) -> dict[bytes, Location]:
        if self._entries is None:
            self._entries = {}
            for ids, locs, _ in self._tables:
                self._add_to_dict(ids, locs)
        return self._entries

    def _add_to_dict(self, ids: np.ndarray, locs: np.ndarray) -> None:
        raw = np.ascontiguousarray(ids).tobytes()
        keys = [raw[i:i + fmt.ID_SIZE] for i in range(0, len(raw), fmt.ID_SIZE)]
        self._entries.update(zip(keys, map(tuple, locs.tolist())))

    def __contains__(self, object_id: bytes) -> bool:
        return self.get(object_id) is not None

    def get(self, object_id: bytes) -> Location | None:
        if self._entries is not None:
            return self._entries.get(object_id)
        row = self.locate_many(np.frombuffer(object_id, dtype=np.uint8).reshape(1, fmt.ID_SIZE))[0]
        return None if row[0] < 0 else (int(row[0]), int(row[1]), int(row[2]))

    def locate_many(self, ids: np.ndarray) -> np.ndarray:
        """(n, 3) int64 locations of the (n, 32) uint8 `ids`; rows of -1 where unknown."""
        wanted = _words(ids)
        merged = self._merged
        if merged is None and len(wanted) <= SMALL_QUERY:
            out = np.full((len(wanted), 3), -1, dtype=np.int64)
            for table in self._tables:
                missing = np.flatnonzero(out[:, 0] < 0)
                if not len(missing):
                    break
                out[missing] = _search(table, wanted[missing])
            return out
        if merged is None:
            # Threads racing here build equal tables; either may be kept.
            merged = self._merged = self._merge()
        return _search(merged, wanted)

    def _merge(self) -> Table:
        """All files in one table. Every file is sorted already: the largest (a full
        snapshot's) is the base, and the others (incremental ones, small) are sorted
        together and merged into it in one pass, which costs a copy of the base
        instead of a sort of everything (~5 ms, not ~19, for 130k entries)."""
        if not self._tables:
            return _table(np.empty((0, 4), dtype=np.uint64), np.empty((0, 3), dtype=np.int64))
        by_size = sorted(self._tables, key=lambda table: len(table[0]), reverse=True)
        base_ids, base_locs, base_prefix = by_size[0]
        if len(by_size) == 1:
            return by_size[0]
        rest_ids = np.concatenate([table[0] for table in by_size[1:]])
        rest_locs = np.concatenate([table[1] for table in by_size[1:]])
        order = np.argsort(rest_ids[:, 0], kind="stable")
        rest_ids, rest_locs = rest_ids[order], rest_locs[order]
        at = np.searchsorted(base_prefix, rest_ids[:, 0])
        return _table(np.insert(base_ids, at, rest_ids, axis=0), np.insert(base_locs, at, rest_locs, axis=0))

    def add_file(self, key: str, index_file: fmt.IndexFile) -> None:
        numbers = []
        for rec, frames in zip(index_file.packs, index_file.frames):
            pack_id = rec["pack_id"].tobytes()
            number = self.pack_numbers.get(pack_id)
            if number is None:
                number = self.pack_numbers[pack_id] = len(self.packs)
                self.packs.append(PackInfo(pack_id, int(rec["size"]), frames, key))
            numbers.append(number)
        entries = index_file.entries
        if len(entries):
            ids = _words(np.ascontiguousarray(fmt.entry_bytes(entries)[:, :fmt.ID_SIZE]))
            if (ids[1:, 0] < ids[:-1, 0]).any():  # written unsorted: sort it here
                order = np.argsort(ids[:, 0], kind="stable")
                entries, ids = entries[order], ids[order]
            locs = np.stack([np.asarray(numbers, dtype=np.int64)[entries["pack"]],
                             entries["frame"].astype(np.int64), entries["slot"].astype(np.int64)], axis=1)
            self._tables.append(_table(ids, locs))
            self._merged = None
            if self._entries is not None:
                self._add_to_dict(ids, locs)
        self.files.add(key)

    def frame(self, loc: Location) -> tuple[PackInfo, np.void]:
        pack = self.packs[loc[0]]
        return pack, pack.frames[loc[1]]


def _table(ids: np.ndarray, locs: np.ndarray) -> Table:
    return ids, locs, np.ascontiguousarray(ids[:, 0])


def _search(table: Table, wanted: np.ndarray) -> np.ndarray:
    """(n, 3) locations of the (n, 4)-word ids `wanted` in `table`; -1 rows where absent."""
    sorted_ids, sorted_locs, prefix = table
    out = np.full((len(wanted), 3), -1, dtype=np.int64)
    if not len(sorted_ids) or not len(wanted):
        return out
    first = np.searchsorted(prefix, wanted[:, 0], side="left")
    last = np.searchsorted(prefix, wanted[:, 0], side="right")
    at = np.minimum(first, len(sorted_ids) - 1)
    found = (first < last) & (sorted_ids[at] == wanted).all(axis=1)
    out[found] = sorted_locs[at[found]]
    # Ids sharing their first 8 bytes with another (guests choose page contents, so
    # such pairs can be made on purpose): look through the whole run.
    for row in np.flatnonzero(~found & (last - first > 1)).tolist():
        run = np.flatnonzero((sorted_ids[first[row]:last[row]] == wanted[row]).all(axis=1))
        if len(run):
            out[row] = sorted_locs[first[row] + run[0]]
    return out


def _words(ids: np.ndarray) -> np.ndarray:
    """32-byte ids (any contiguous uint8 layout) as an (n, 4) uint64 array."""
    return np.ascontiguousarray(ids, dtype=np.uint8).reshape(-1, fmt.ID_SIZE).view("<u8")


def load_index(store: ObjectStore, previous: Index | None = None, threads: int = 8,
               attempts: int = 3, cache: IndexCache | None = None,
               crypto: NoEncryption = NoEncryption()) -> Index:
    """Read every index file; reuse `previous` when files were only added since, and
    the copies in `cache` of files read before."""
    keys = {info.key for info in store.list(fmt.INDEX_PREFIX)}
    index = previous if previous is not None and previous.files <= keys else Index()
    todo = sorted(keys - index.files)

    def fetch(key: str) -> tuple[str, fmt.IndexFile | CorruptObject | None]:
        cached = cache.load(key) if cache is not None else None
        if cached is not None:
            return key, cached
        try:
            stored = store.get(key)
            index_file = fmt.decode_index(key, stored, crypto)
        except ObjectNotFound:
            return key, None  # replaced by gc between list and get
        except CorruptObject as e:
            return key, e
        if cache is not None:
            cache.save(key, index_file, stored)
        return key, index_file

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo)))) as pool:
        results = list(pool.map(fetch, todo))
    if any(f is None for _, f in results):
        # gc consolidated the index while we read it: start over.
        if attempts <= 1:
            raise RepositoryError(f"the index of {store.url} keeps changing while being read; "
                                  f"retry when gc has finished")
        return load_index(store, None, threads, attempts - 1, cache, crypto)
    index.damaged = {}
    for key, index_file in results:
        if isinstance(index_file, CorruptObject):
            index.damaged[key] = index_file.problem
        else:
            index.add_file(key, index_file)
    if cache is not None:
        cache.prune(keys)
    return index


def require(index: Index, object_id: bytes, what: str) -> Location:
    loc = index.get(object_id)
    if loc is None:
        raise not_indexed(f"{what}: object {object_id.hex()}", index)
    return loc


def not_indexed(what: str, index: Index) -> RepositoryError:
    if index.damaged:
        several = len(index.damaged) > 1
        cause = (f"index file{'s' if several else ''} {', '.join(sorted(index.damaged))} "
                 f"{'are' if several else 'is'} damaged ({index.damaged[min(index.damaged)]}); run "
                 f"`snapvisor repair-index`, which indexes {'their' if several else 'its'} packs again")
    else:
        cause = ("an index file or pack is missing; run `snapvisor verify`, and `snapvisor repair-index` "
                 "if index files were lost")
    return RepositoryError(f"{what} is not in the repository index: {cause}")


def require_intact(index: Index, operation: str) -> None:
    """Refuse `operation` (one that deletes by the index: gc) while index files are damaged:
    the packs that only they list would look unreferenced."""
    if index.damaged:
        key, why = sorted(index.damaged.items())[0]
        raise RepositoryError(f"{operation} stopped, nothing deleted: index file {key} is damaged ({why}); "
                              f"run `snapvisor repair-index` first")

