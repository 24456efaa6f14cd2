"""Repository: a snapshot store on top of an ObjectStore (see docs/format.md)."""

from __future__ import annotations

import base64
import binascii
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from snapvisor.store import format as fmt
from snapvisor.store import keys as keyfiles
from snapvisor.store.backend import ObjectStore, open_backend
from snapvisor.store.crypto import CIPHER, ID_HASH, Encryption, NoEncryption
from snapvisor.store.errors import (
    CorruptObject,
    KeyFileError,
    ObjectNotFound,
    RepositoryError,
    SnapshotNotFound,
    UnreadableManifest,
)
from snapvisor.store.index import Index, load_index
from snapvisor.store.index_cache import IndexCache, SealedIndexCache
from snapvisor.store.locks import EXCLUSIVE, SHARED, LockManager, StaleLock
from snapvisor.store.manifest import Manifest, SnapshotInfo, decode_manifest, snapshot_key
from snapvisor.store.password import PasswordSource, password_needed
from snapvisor.store.reader import Snapshot
from snapvisor.store.retention import KeepPolicy, PruneResult, apply_policy
from snapvisor.store.writer import SnapshotWriter

CONFIG_KIND = "snapvisor-repository"
DEFAULT_PACK_SIZE = 16 << 20
DEFAULT_FRAME_PAGES = 64        # 256 KiB compression frames
DEFAULT_MAP_BLOCK_PAGES = 64    # one map block per 256 KiB of guest memory


Password = PasswordSource | str | bytes  # a source, or the password itself (from a program)


def _source(password: Password | None) -> PasswordSource | None:
    """The password source to use: the one given, else the environment's."""
    if password is None:
        return PasswordSource.from_environment()
    return password if isinstance(password, PasswordSource) else PasswordSource.given(password)


def _config_context(repository_id: str) -> str:
    return f"config of repository {repository_id}"


def _config_lost(url: str, problem: str) -> str:
    return (f"the repository at {url} cannot be opened: its `config` object is {problem}; snapshots and "
            f"data are not affected: copy `config` back from another copy of the repository (it holds "
            f"the repository's id and parameters, and is never rewritten)")


class Repository:
    def __init__(self, store: ObjectStore, config: dict, *, crypto: NoEncryption = NoEncryption(),
                 key_id: str | None = None, threads: int | None = None,
                 io_threads: int | None = None, lock_wait: float = 30.0):
        self.store = store
        self.config = config
        self.crypto = crypto
        self.key_id = key_id  # the key file that opened an encrypted repository
        self.threads = threads or max(1, min(os.cpu_count() or 1, 8))
        self.io_threads = io_threads or (8 if store.url.startswith("s3://") else 2)
        self.lock_wait = lock_wait
        self.locks = LockManager(store, crypto=crypto)
        self._index: Index | None = None
        self._index_stale = False
        self._index_lock = threading.Lock()
        # Index files on local disk (an in-memory store has nothing to gain): decoded,
        # or, for an encrypted repository, sealed as stored (never in the clear).
        self.index_cache = None if store.url.startswith("memory:") else \
            SealedIndexCache.for_encrypted(config["id"], crypto) if crypto.encrypted else \
            IndexCache.for_repository(config["id"])
        self._manifests: dict[str, Manifest] = {}

    # -- creation and opening -------------------------------------------------------

    @classmethod
    def init(cls, store: ObjectStore, *, password: Password | None = None,
             pack_size: int = DEFAULT_PACK_SIZE, frame_pages: int = DEFAULT_FRAME_PAGES,
             map_block_pages: int = DEFAULT_MAP_BLOCK_PAGES, zstd_level: int = 1,
             **options) -> "Repository":
        """A new repository: encrypted with a fresh master key wrapped by `password`
        (a PasswordSource, or the password itself), or unencrypted when it is None."""
        if not (1 << 16) <= pack_size <= (1 << 30) or not 1 <= frame_pages <= 4096 \
                or not 8 <= map_block_pages <= 65536 or not 1 <= zstd_level <= 22:
            raise RepositoryError("repository parameters out of range: pack_size 64 KiB..1 GiB, "
                                  "frame_pages 1..4096, map_block_pages 8..65536, zstd_level 1..22")
        repository_id = uuid.uuid4().hex
        header = {"kind": CONFIG_KIND, "format": fmt.FORMAT_VERSION, "id": repository_id}
        params = {
            "created": datetime.now(timezone.utc).isoformat(), "page_size": fmt.PAGE_SIZE,
            "hash": "sha256", "compression": "zstd", "zstd_level": zstd_level,
            "pack_size": pack_size, "frame_pages": frame_pages,
            "map_block_pages": map_block_pages,
        }
        exists = RepositoryError(f"a repository already exists at {store.url}; open it instead "
                                 f"of initialising it")
        if store.head(fmt.CONFIG_KEY) is not None or any(True for _ in store.list(fmt.SNAPSHOT_PREFIX)):
            raise exists
        if password is None:
            crypto, key_id, config = NoEncryption(), None, {**header, **params}
            stored = config
        else:
            secret = _source(password).read()  # a failing source stops before anything is written
            crypto = Encryption.generate()
            params["hash"] = ID_HASH
            header["encryption"] = {"cipher": CIPHER, "ids": ID_HASH}
            config = {**header, **params}
            sealed = crypto.seal(fmt.canonical_json(params), _config_context(repository_id))
            stored = {**header, "sealed": base64.b64encode(sealed).decode()}
            # The key first: a config that no key opens would be a repository nobody can use.
            key_id = keyfiles.write_key(store, repository_id, crypto, secret)
        if not store.put(fmt.CONFIG_KEY, fmt.canonical_json(stored)):
            if key_id is not None:
                store.delete(keyfiles.KEY_PREFIX + key_id)
            raise exists
        return cls(store, config, crypto=crypto, key_id=key_id, **options)

    @classmethod
    def open(cls, store: ObjectStore, *, password: Password | None = None, **options) -> "Repository":
        """Open the repository of `store`; an encrypted one needs `password` (a
        PasswordSource or the password), else SNAPVISOR_PASSWORD_FILE/_COMMAND."""
        try:
            data = store.get(fmt.CONFIG_KEY)
        except ObjectNotFound:
            if any(True for _ in store.list(fmt.SNAPSHOT_PREFIX)):
                raise RepositoryError(_config_lost(store.url, "missing")) from None
            raise RepositoryError(f"no snapvisor repository at {store.url} (no 'config' object); "
                                  f"create it with `snapvisor init --repo {store.url}` (or let the first "
                                  f"snapshot written into it create it: `snapvisor snapshot`, `snapvisor run "
                                  f"--snapshot-every`)") from None
        try:
            config = fmt.decode_json(fmt.CONFIG_KEY, data, CONFIG_KIND)
        except CorruptObject as e:
            raise RepositoryError(_config_lost(store.url, f"damaged: {e.problem}")) from None
        crypto, key_id = NoEncryption(), None
        if "encryption" in config:
            crypto, key_id, config = cls._unlock(store, config, password)
        elif config.get("hash") != "sha256":
            raise RepositoryError(f"{store.url} uses hash {config.get('hash')!r}, which this snapvisor "
                                  f"cannot read")
        for name, kind in (("pack_size", int), ("frame_pages", int), ("map_block_pages", int),
                           ("zstd_level", int), ("page_size", int)):
            if not isinstance(config.get(name), kind):
                raise RepositoryError(_config_lost(store.url, f"damaged: {name!r} missing or not a number"))
        if config["page_size"] != fmt.PAGE_SIZE:
            raise RepositoryError(f"{store.url} uses page size {config['page_size']}, which this "
                                  f"snapvisor cannot read")
        return cls(store, config, crypto=crypto, key_id=key_id, **options)

    @staticmethod
    def _unlock(store: ObjectStore, header: dict, password: Password | None
                ) -> tuple[Encryption, str, dict]:
        """(master key, key file id, whole config) of an encrypted repository."""
        if header["encryption"] != {"cipher": CIPHER, "ids": ID_HASH}:
            raise RepositoryError(f"{store.url} is encrypted with {header['encryption']!r}, which this "
                                  f"snapvisor cannot read (it knows {CIPHER} with {ID_HASH} ids)")
        source = _source(password)
        if source is None:
            raise password_needed(store.url)
        crypto, key_id = keyfiles.open_master(store, str(header["id"]), source)
        try:
            sealed = base64.b64decode(header["sealed"], validate=True)
        except (KeyError, TypeError, binascii.Error):
            raise RepositoryError(_config_lost(store.url, "damaged: its sealed part is missing or not "
                                                          "base64")) from None
        try:
            params = fmt.decode_json_object(fmt.unseal_object(
                crypto, fmt.CONFIG_KEY, sealed, _config_context(header["id"])))
        except CorruptObject as e:
            raise RepositoryError(_config_lost(store.url, f"damaged: {e.problem}")) from None
        if params.get("hash") != ID_HASH:
            raise RepositoryError(_config_lost(store.url, "damaged: its id hash is not " + ID_HASH))
        return crypto, key_id, {**params, **{k: v for k, v in header.items() if k != "sealed"}}

    @classmethod
    def open_url(cls, url: str, create: bool = False, password: Password | None = None,
                 **options) -> "Repository":
        """Open the repository at `url`. With `create`, a missing one is created:
        encrypted when a password (or SNAPVISOR_PASSWORD_FILE/_COMMAND) is there."""
        backend_opts = {k: options.pop(k) for k in list(options)
                        if k not in ("threads", "io_threads", "lock_wait", "pack_size",
                                     "frame_pages", "map_block_pages", "zstd_level")}
        store = open_backend(url, **backend_opts)
        if create and store.head(fmt.CONFIG_KEY) is None:
            return cls.init(store, password=_source(password), **options)
        for k in ("pack_size", "frame_pages", "map_block_pages", "zstd_level"):
            options.pop(k, None)
        return cls.open(store, password=password, **options)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Repository":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- parameters ------------------------------------------------------------------

    @property
    def pack_size(self) -> int:
        return self.config["pack_size"]

    @property
    def frame_pages(self) -> int:
        return self.config["frame_pages"]

    @property
    def map_block_pages(self) -> int:
        return self.config["map_block_pages"]

    @property
    def zstd_level(self) -> int:
        return self.config["zstd_level"]

    # -- index -----------------------------------------------------------------------

    @property
    def index(self) -> Index:
        with self._index_lock:
            if self._index is None or self._index_stale:
                self._index = load_index(self.store, self._index, self.io_threads, cache=self.index_cache,
                                         crypto=self.crypto)
                self._index_stale = False
            return self._index

    def refresh_index(self, full: bool = False) -> Index:
        """Re-list the index. `full` reads every index file from the repository again,
        trusting neither memory nor the local cache (gc does, before deleting)."""
        with self._index_lock:
            self._index = load_index(self.store, None if full else self._index, self.io_threads,
                                     cache=None if full else self.index_cache, crypto=self.crypto)
            self._index_stale = False
            return self._index

    def _mark_index_stale(self) -> None:
        self._index_stale = True

    # -- snapshots ---------------------------------------------------------------------

    def start_snapshot(self, parent: str | None = None, threads: int | None = None
                       ) -> SnapshotWriter:
        lock = self.locks.acquire(SHARED, "snapshot", wait=self.lock_wait)
        try:
            self.refresh_index()
            parent_snapshot = self.get_snapshot(parent) if parent else None
        except BaseException:
            lock.release()
            raise
        return SnapshotWriter(self, parent_snapshot, lock, threads or self.threads)

    def _manifest(self, snapshot_id: str) -> Manifest:
        manifest = self._manifests.get(snapshot_id)
        if manifest is None:
            key = snapshot_key(snapshot_id)
            try:
                data = self.store.get(key)
            except ObjectNotFound:
                raise SnapshotNotFound(f"snapshot {snapshot_id} not found in {self.store.url}; "
                                       f"`snapvisor ls` lists the ones there") from None
            try:
                manifest = decode_manifest(key, data, self.crypto)
            except RepositoryError as e:
                problem = e.problem if isinstance(e, CorruptObject) else str(e)
                raise UnreadableManifest(
                    f"snapshot {snapshot_id} cannot be read: its manifest {key} is damaged ({problem}); "
                    f"copy that object back from another copy of the repository, or give the snapshot "
                    f"up with `snapvisor forget {snapshot_id[:12]}`") from None
            self._manifests[snapshot_id] = manifest
        return manifest

    def snapshot_ids(self) -> list[str]:
        return sorted(info.key[len(fmt.SNAPSHOT_PREFIX):]
                      for info in self.store.list(fmt.SNAPSHOT_PREFIX))

    def read_manifests(self) -> tuple[list[Manifest], dict[str, str]]:
        """The manifest of every snapshot that reads, and the ids of those that do not
        (id -> the error, which says what to do). A snapshot forgotten meanwhile is
        in neither."""
        def read(snapshot_id: str) -> Manifest | str | None:
            try:
                return self._manifest(snapshot_id)
            except SnapshotNotFound:
                return None
            except UnreadableManifest as e:
                return str(e)

        ids = self.snapshot_ids()
        with ThreadPoolExecutor(max_workers=self.io_threads) as pool:
            results = list(pool.map(read, ids))
        manifests = [r for r in results if isinstance(r, Manifest)]
        unreadable = {i: r for i, r in zip(ids, results) if isinstance(r, str)}
        return manifests, unreadable

    def list_snapshots(self) -> list[SnapshotInfo]:
        """The snapshots whose manifests read, oldest first (read_manifests names the others)."""
        manifests, _ = self.read_manifests()
        return sorted((m.info for m in manifests), key=lambda i: (i.time, i.id))

    def resolve(self, id_or_prefix: str) -> str:
        if not isinstance(id_or_prefix, str) or not id_or_prefix or \
                any(c not in "0123456789abcdef" for c in id_or_prefix):
            raise RepositoryError(f"{id_or_prefix!r} is not a snapshot id (lowercase hex)")
        found = [i for i in self.snapshot_ids() if i.startswith(id_or_prefix)]
        if not found:
            raise RepositoryError(f"no snapshot {id_or_prefix!r} in {self.store.url}; "
                                  f"`snapvisor ls` lists the ones there")
        if len(found) > 1:
            raise RepositoryError(f"snapshot prefix {id_or_prefix!r} is ambiguous "
                                  f"({len(found)} snapshots match); give more characters")
        return found[0]

    def get_snapshot(self, id_or_prefix: str) -> Snapshot:
        return Snapshot(self, self._manifest(self.resolve(id_or_prefix)))

    def delete_snapshot(self, id_or_prefix: str) -> None:
        """Forget one snapshot; its data is reclaimed by gc when nothing else uses it."""
        snapshot_id = self.resolve(id_or_prefix)
        self.store.delete(snapshot_key(snapshot_id))
        self._manifests.pop(snapshot_id, None)

    # -- keys (encrypted repositories) -----------------------------------------------------

    @property
    def encrypted(self) -> bool:
        return self.crypto.encrypted

    def _require_encryption(self) -> Encryption:
        if not isinstance(self.crypto, Encryption):
            raise KeyFileError(f"the repository at {self.store.url} is not encrypted: it has no keys "
                               f"(copy its snapshots into an encrypted one to encrypt them)")
        return self.crypto

    def keys(self) -> list[keyfiles.KeyInfo]:
        self._require_encryption()
        return keyfiles.list_keys(self.store, self.key_id)

    def add_key(self, password: Password) -> str:
        """A new key file for `password`; returns its id."""
        return keyfiles.write_key(self.store, self.config["id"], self._require_encryption(),
                              _source(password).read())

    def remove_key(self, key_id_prefix: str) -> str:
        self._require_encryption()
        return keyfiles.remove_key(self.store, key_id_prefix, self.key_id)

    def change_password(self, password: Password) -> str:
        """Replace the key this repository was opened with by one for `password`."""
        new = self.add_key(password)
        old, self.key_id = self.key_id, new
        self.store.delete(keyfiles.KEY_PREFIX + old)
        return new

    # -- maintenance ---------------------------------------------------------------------

    def prune(self, policy: KeepPolicy, dry_run: bool = False, vm: str | None = None
              ) -> PruneResult:
        snapshots = [s for s in self.list_snapshots() if vm is None or s.vm == vm]
        result = PruneResult([], [], {}, dry_run)
        if policy.is_empty():
            apply_policy([], policy)  # raises the explanation
        for name in sorted({s.vm for s in snapshots}):
            part = apply_policy([s for s in snapshots if s.vm == name], policy)
            result.keep += part.keep
            result.remove += part.remove
            result.reasons.update(part.reasons)
        if not dry_run:
            for snap in result.remove:
                self.delete_snapshot(snap.id)
        return result

    def gc(self, dry_run: bool = False, repack_below: float | None = None):
        """Delete unreferenced data; repack packs more than `repack_below` garbage."""
        from snapvisor.store.gc import REPACK_BELOW, collect_garbage

        with self.locks.acquire(EXCLUSIVE, "gc", wait=self.lock_wait):
            return collect_garbage(self, dry_run,
                                   REPACK_BELOW if repack_below is None else repack_below)

    def repair_index(self, dry_run: bool = False):
        """Index again the packs no readable index file lists (after index files were
        lost or damaged), then drop the damaged index files."""
        from snapvisor.store.repair import repair_index

        with self.locks.acquire(EXCLUSIVE, "repair-index", wait=self.lock_wait):
            return repair_index(self, dry_run)

    def unlock(self, everything: bool = False) -> list[StaleLock]:
        """Remove the stale locks (those of processes gone or not refreshed within the
        lock lifetime), or with `everything` every lock; returns what was removed."""
        return self.locks.remove_all() if everything else self.locks.remove_stale()

    def verify(self, read_data: bool = False):
        from snapvisor.store.verify import verify_repository

        with self.locks.acquire(SHARED, "verify", wait=self.lock_wait):
            return verify_repository(self, read_data)
