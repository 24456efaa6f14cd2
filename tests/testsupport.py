"""Helpers shared by test directories (a module with a unique name: every test
directory is on sys.path, so a second `conftest` import would be ambiguous)."""

from __future__ import annotations

import io
import time


def s3_options(s3_server: tuple[str, str, str]) -> dict:
    """Repository.open_url keyword arguments for the `s3_server` fixture's server."""
    endpoint, key, secret = s3_server
    return {"endpoint_url": endpoint, "access_key": key, "secret_key": secret}


def wait_until(condition, timeout: float, what: str, interval: float = 0.05):
    """condition()'s first true value, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def hostile_address(rng, data: int, ram: int) -> int:
    """A guest-physical address a fuzzed virtqueue descriptor may name: an ordinary
    buffer at `data`, anywhere in guest RAM (`ram` bytes), across its end, past
    it, in the MMIO hole, or one that wraps around 2^64."""
    return rng.choice([
        data + rng.randrange(0, 64 * 1024),
        rng.randrange(0, ram),
        ram - rng.randrange(0, 64),
        ram + rng.randrange(0, 1 << 20),
        0xD000_0000 + rng.randrange(0, 0x1000),
        (1 << 64) - rng.randrange(1, 4096),
    ])


def wait_for_output(buffer: io.BytesIO, needle: bytes, timeout: float) -> bytes:
    """Poll a serial BytesIO until `needle` appears; returns everything so far."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = buffer.getvalue()
        if needle in data:
            return data
        time.sleep(0.005)
    raise AssertionError(f"{needle!r} did not appear within {timeout} s; serial so far: {buffer.getvalue()!r}")


def words_found(store, needles) -> int:
    """How many of the 8-byte `needles` (a uint64 array) occur, at any byte offset,
    in any object of `store`: a search of every stored byte for page contents."""
    import numpy as np

    needles = np.unique(np.asarray(needles, dtype=np.uint64))
    found = np.zeros(len(needles), dtype=bool)
    for info in store.list(""):
        data = np.frombuffer(store.get(info.key), dtype=np.uint8)
        for shift in range(8):
            usable = (len(data) - shift) // 8 * 8
            if usable > 0:
                found |= np.isin(needles, data[shift:shift + usable].view("<u8"))
    return int(found.sum())


def page_words(memory, ids=None):
    """Needles for words_found: 8 bytes from the middle of each non-zero page of
    `memory`, and the first 8 bytes of each of the page ids `ids` ((n, 32) bytes)."""
    import numpy as np

    pages = np.frombuffer(memory, dtype=np.uint8).reshape(-1, 4096)
    pages = pages[pages.any(axis=1)]
    words = [np.ascontiguousarray(pages[:, 2048:2056]).view("<u8").ravel()]
    if ids is not None:
        words.append(np.ascontiguousarray(np.asarray(ids, dtype=np.uint8)[:, :8]).view("<u8").ravel())
    return np.concatenate(words)
