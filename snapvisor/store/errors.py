"""Errors of the store layer. Each message names the object and says what to do."""

from snapvisor.errors import SnapvisorError

__all__ = ["SnapvisorError", "StoreError", "ObjectNotFound", "RepositoryError", "CorruptObject",
           "RepositoryLocked", "SnapshotNotFound", "UnreadableManifest", "PasswordNeeded",
           "WrongPassword", "KeyFileError"]


class StoreError(SnapvisorError):
    """A backend operation failed (I/O, network, credentials, missing bucket)."""


class ObjectNotFound(StoreError):
    """The named object does not exist in the backend."""

    def __init__(self, url: str, key: str):
        super().__init__(f"object {key!r} not found in {url}")
        self.key = key


class RepositoryError(SnapvisorError):
    """The repository is missing, malformed, corrupt, or the request does not fit it."""


class CorruptObject(RepositoryError):
    """An object's bytes do not match its format or its content hash."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key} is corrupt: {problem}; run `snapvisor verify --read-data` "
                         f"to list every damaged object, restore from another copy of the repository")
        self.key = key
        self.problem = problem


class SnapshotNotFound(RepositoryError):
    """No manifest of that id (forgotten, or never there)."""


class UnreadableManifest(RepositoryError):
    """A snapshot's manifest is damaged or of an unknown format: the snapshot is
    listed as damaged, and gc deletes nothing while it is there."""


class RepositoryLocked(RepositoryError):
    """Another process holds a lock that conflicts with the requested operation."""


class PasswordNeeded(RepositoryError):
    """The repository is encrypted and no password source was given."""


class WrongPassword(RepositoryError):
    """No key file of the repository opens with the password given."""


class KeyFileError(RepositoryError):
    """The keys/ folder is missing, or a key file is damaged or of another repository,
    or a key operation would leave the repository without a key."""
