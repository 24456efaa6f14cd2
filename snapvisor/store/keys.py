"""Key files: the repository's master key, wrapped by keys derived from passwords.

`keys/<32 hex>` is JSON: the repository id, who created it and when, scrypt's
parameters and salt, and the master key sealed (AES-256-GCM) under the key scrypt
derives from the password. Several key files wrap the same master key: one per
password (`snapvisor key add|remove|passwd`). A repository always keeps one.
"""

from __future__ import annotations

import base64
import functools
import getpass
import hashlib
import json
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timezone

from snapvisor.store.backend import ObjectStore
from snapvisor.store.crypto import KEY_SIZE, Encryption
from snapvisor.store.errors import KeyFileError, ObjectNotFound, WrongPassword
from snapvisor.store.password import PasswordSource

KEY_PREFIX = "keys/"
KEY_KIND = "snapvisor-key"
# scrypt with 32 MiB of memory, about 0.1-0.2 s per try on a server core.
SCRYPT = {"n": 1 << 15, "r": 8, "p": 1}
SCRYPT_MAXMEM = 256 << 20
SALT_SIZE = 16


@dataclass
class KeyInfo:
    id: str         # the key file's name under keys/
    created: str
    host: str
    user: str
    current: bool   # the key this repository was opened with


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@functools.lru_cache(maxsize=32)
def _derive(password: bytes, salt: bytes, n: int, r: int, p: int) -> Encryption:
    """The key that wraps the master key (a cache: each derivation costs 32 MiB and
    a tenth of a second, and tests open repositories many times)."""
    key = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=KEY_SIZE)
    return Encryption(key, bytes(KEY_SIZE))


def _context(repository_id: str) -> str:
    return f"master key of repository {repository_id}"


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name: a container without USER or passwd entry
        return ""


def write_key(store: ObjectStore, repository_id: str, master: Encryption, password: bytes) -> str:
    """A new key file wrapping `master` under `password`; returns its id."""
    salt = os.urandom(SALT_SIZE)
    wrapping = _derive(password, salt, **SCRYPT)
    record = {
        "kind": KEY_KIND, "format": 1, "repository": repository_id,
        "created": datetime.now(timezone.utc).isoformat(), "host": socket.gethostname(),
        "user": _user(),
        "kdf": {"name": "scrypt", **SCRYPT, "salt": _b64(salt)},
        "master": _b64(wrapping.seal(master.to_bytes(), _context(repository_id))),
    }
    key_id = secrets.token_hex(16)
    store.put(KEY_PREFIX + key_id, json.dumps(record, sort_keys=True).encode())
    return key_id


def _read_record(store: ObjectStore, key_id: str) -> dict:
    data = store.get(KEY_PREFIX + key_id)
    try:
        record = json.loads(data)
        kdf = record["kdf"]
        if record.get("kind") != KEY_KIND or kdf.get("name") != "scrypt":
            raise ValueError("not a snapvisor scrypt key")
        for name in ("n", "r", "p"):
            if not isinstance(kdf[name], int) or not 1 <= kdf[name] <= (1 << 24):
                raise ValueError(f"kdf parameter {name} out of range")
        if kdf["n"] & (kdf["n"] - 1) or 128 * kdf["r"] * kdf["n"] > SCRYPT_MAXMEM:
            raise ValueError("kdf parameters out of range")
        base64.b64decode(kdf["salt"], validate=True)
        base64.b64decode(record["master"], validate=True)
        str(record["repository"])
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise KeyFileError(f"key file {KEY_PREFIX}{key_id} in {store.url} is damaged ({e}): copy it back "
                           f"from another copy of the repository, or remove it with `snapvisor key remove "
                           f"{key_id[:8]}` using another key") from None
    return record


def key_ids(store: ObjectStore) -> list[str]:
    return sorted(info.key[len(KEY_PREFIX):] for info in store.list(KEY_PREFIX))


def open_master(store: ObjectStore, repository_id: str, source: PasswordSource) -> tuple[Encryption, str]:
    """(master key, id of the key file that opened) for the password of `source`."""
    ids = key_ids(store)
    if not ids:
        raise KeyFileError(f"the repository at {store.url} is encrypted but has no key files (the keys/ "
                           f"folder is missing or empty); copy keys/ back from another copy of the "
                           f"repository: without a key file its data cannot be read")
    password = source.read()
    others: list[str] = []
    damaged: list[str] = []
    for key_id in ids:
        try:
            record = _read_record(store, key_id)
        except ObjectNotFound:
            continue
        except KeyFileError as e:
            damaged.append(str(e))
            continue
        if record["repository"] != repository_id:
            others.append(f"{key_id} (of repository {record['repository']})")
            continue
        kdf = record["kdf"]
        wrapping = _derive(password, base64.b64decode(kdf["salt"]), kdf["n"], kdf["r"], kdf["p"])
        try:
            master = wrapping.unseal(base64.b64decode(record["master"]), _context(repository_id))
        except ValueError:
            continue
        return Encryption.from_bytes(master), key_id
    if damaged and not others and len(damaged) == len(ids):
        raise KeyFileError(damaged[0] + ("" if len(damaged) == 1 else f" (and {len(damaged) - 1} more)"))
    if others and len(others) + len(damaged) == len(ids):
        raise KeyFileError(f"the key files in {store.url}/{KEY_PREFIX} belong to another repository "
                           f"({', '.join(others)}), not to {repository_id}; copy this repository's own "
                           f"keys/ back")
    raise WrongPassword(f"no key in {store.url} opens with this password (from the {source.describe()}, "
                        f"{len(ids) - len(others) - len(damaged)} key file(s) tried); check the password "
                        f"source; nothing was changed"
                        + (f"; also: {damaged[0]}" if damaged else ""))


def list_keys(store: ObjectStore, current: str | None) -> list[KeyInfo]:
    out = []
    for key_id in key_ids(store):
        try:
            record = _read_record(store, key_id)
        except ObjectNotFound:
            continue
        out.append(KeyInfo(key_id, str(record.get("created", "")), str(record.get("host", "")),
                           str(record.get("user", "")), key_id == current))
    return out


def remove_key(store: ObjectStore, key_id_prefix: str, current: str | None) -> str:
    """Delete one key file (never the last one, nor the one in use); returns its id."""
    ids = key_ids(store)
    found = [k for k in ids if k.startswith(key_id_prefix)] if key_id_prefix else []
    if len(found) != 1:
        raise KeyFileError(f"{'no' if not found else 'more than one'} key file in {store.url} matches "
                           f"{key_id_prefix!r}; `snapvisor key list` shows their ids")
    if len(ids) == 1:
        raise KeyFileError(f"key {found[0]} is the last key of {store.url}; removing it would make the "
                           f"repository unreadable: add another key first (`snapvisor key add`)")
    if found[0] == current:
        raise KeyFileError(f"key {found[0]} is the one this command opened the repository with; open "
                           f"it with another password to remove this key, or use `snapvisor key passwd`")
    store.delete(KEY_PREFIX + found[0])
    return found[0]
