"""The in-memory union of the repository's index files: object id -> (pack, frame, slot)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from snapvisor.store import format as fmt
from snapvisor.store.backend import ObjectStore
from snapvisor.store.errors import ObjectNotFound, RepositoryError


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


class Index:
    def __init__(self) -> None:
        self.packs: list[PackInfo] = []
        self.pack_numbers: dict[bytes, int] = {}
        self.entries: dict[bytes, Location] = {}
        self.files: set[str] = set()

    def __contains__(self, object_id: bytes) -> bool:
        return object_id in self.entries

    def get(self, object_id: bytes) -> Location | None:
        return self.entries.get(object_id)

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
            ids = entries["id"].tobytes()
            keys = [ids[i:i + fmt.ID_SIZE] for i in range(0, len(ids), fmt.ID_SIZE)]
            packs = np.asarray(numbers, dtype=np.int64)[entries["pack"]].tolist()
            self.entries.update(zip(keys, zip(packs, entries["frame"].tolist(),
                                              entries["slot"].tolist())))
        self.files.add(key)

    def frame(self, loc: Location) -> tuple[PackInfo, np.void]:
        pack = self.packs[loc[0]]
        return pack, pack.frames[loc[1]]


def load_index(store: ObjectStore, previous: Index | None = None, threads: int = 8,
               attempts: int = 3) -> Index:
    """Read every index file; reuse `previous` when files were only added since."""
    keys = {info.key for info in store.list(fmt.INDEX_PREFIX)}
    index = previous if previous is not None and previous.files <= keys else Index()
    todo = sorted(keys - index.files)

    def fetch(key: str) -> tuple[str, fmt.IndexFile | None]:
        try:
            return key, fmt.decode_index(key, store.get(key))
        except ObjectNotFound:
            return key, None  # replaced by gc between list and get

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo)))) as pool:
        results = list(pool.map(fetch, todo))
    if any(f is None for _, f in results):
        # gc consolidated the index while we read it: start over.
        if attempts <= 1:
            raise RepositoryError(f"the index of {store.url} keeps changing while being read; "
                                  f"retry when gc has finished")
        return load_index(store, None, threads, attempts - 1)
    for key, index_file in results:
        index.add_file(key, index_file)
    return index


def require(index: Index, object_id: bytes, what: str) -> Location:
    loc = index.get(object_id)
    if loc is None:
        raise RepositoryError(f"{what}: object {object_id.hex()} is not in the repository index "
                              f"(missing index file or pack); run `snapvisor verify`")
    return loc

