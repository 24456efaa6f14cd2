"""Sealing stored objects and naming them by keyed ids (see docs/format.md, Encryption).

A repository is either unencrypted (`NoEncryption`: objects stored as they are, ids
are plain SHA-256) or encrypted (`Encryption`: every object sealed with AES-256-GCM
under the master key, ids are HMAC-SHA256 under a separate id key, so the store
learns nothing about content and cannot test whether a given page is stored).

A sealed object is `nonce (12 random bytes) | ciphertext | tag (16 bytes)`. The
associated data is the object's role and place (e.g. "frame data/ab/ab12.. 7"),
so bytes moved to another object, frame or role fail authentication.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_SIZE = 12
TAG_SIZE = 16
SEAL_OVERHEAD = NONCE_SIZE + TAG_SIZE
KEY_SIZE = 32
CIPHER = "aes-256-gcm"
ID_HASH = "hmac-sha256"


class NoEncryption:
    """An unencrypted repository: objects are stored as they are."""

    encrypted = False
    id_key: bytes | None = None

    def object_id(self, data) -> bytes:
        return hashlib.sha256(data).digest()

    def seal(self, data, context: str) -> bytes:
        return data if isinstance(data, bytes) else bytes(data)

    def unseal(self, data, context: str) -> bytes:
        return data if isinstance(data, bytes) else bytes(data)


class Encryption(NoEncryption):
    """An encrypted repository's master key: `enc_key` seals, `id_key` names."""

    encrypted = True

    def __init__(self, enc_key: bytes, id_key: bytes):
        if len(enc_key) != KEY_SIZE or len(id_key) != KEY_SIZE:
            raise ValueError("master key parts must be 32 bytes each")
        self._aead = AESGCM(enc_key)
        self.enc_key = enc_key
        self.id_key = id_key

    @classmethod
    def generate(cls) -> "Encryption":
        return cls(os.urandom(KEY_SIZE), os.urandom(KEY_SIZE))

    @classmethod
    def from_bytes(cls, master: bytes) -> "Encryption":
        return cls(master[:KEY_SIZE], master[KEY_SIZE:])

    def to_bytes(self) -> bytes:
        return self.enc_key + self.id_key

    def object_id(self, data) -> bytes:
        return hmac.digest(self.id_key, data, "sha256")

    def seal(self, data, context: str) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, bytes(data), context.encode())

    def seal_in_place(self, buf: bytearray, offset: int, sealed_len: int, context: str) -> None:
        """Seal the plaintext at buf[offset + NONCE_SIZE : offset + sealed_len - TAG_SIZE]
        where it lies: the nonce goes before it, the ciphertext over it, the tag after
        (a pack's frames are laid out with that room, and sealed by the upload thread)."""
        nonce = os.urandom(NONCE_SIZE)
        plain = memoryview(buf)[offset + NONCE_SIZE:offset + sealed_len - TAG_SIZE]
        sealed = self._aead.encrypt(nonce, plain, context.encode())
        del plain
        buf[offset:offset + NONCE_SIZE] = nonce
        buf[offset + NONCE_SIZE:offset + sealed_len] = sealed

    def unseal(self, data, context: str) -> bytes:
        """The plaintext; ValueError when the bytes were changed, truncated, or sealed
        for another object, place or repository."""
        view = memoryview(data)
        if len(view) < SEAL_OVERHEAD:
            raise ValueError(f"{context}: {len(view)} bytes is too short for a sealed object (truncated)")
        try:
            return self._aead.decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:], context.encode())
        except InvalidTag:
            raise ValueError(f"{context} fails authentication (changed, truncated or moved "
                             f"bytes, or sealed by another repository)") from None


Crypto = NoEncryption  # the type every repository has: NoEncryption or Encryption
