"""Frame compression: zstd, or the raw bytes when zstd does not shrink them."""

from __future__ import annotations

import threading

import zstandard

from snapvisor.store.format import frame_context

CODEC_RAW = 0
CODEC_ZSTD = 1

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # ZstdCompressor objects are not thread-safe; keep one per thread and level.
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True,
                                                        write_content_size=True)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "decompressor", None)
    if dec is None:
        dec = _local.decompressor = zstandard.ZstdDecompressor()
    return dec


def compress(data, level: int) -> tuple[int, bytes]:
    """(codec, payload) for a frame's raw bytes."""
    raw = memoryview(data).cast("B")
    packed = _compressor(level).compress(raw)
    if len(packed) >= len(raw):
        return CODEC_RAW, raw.tobytes()
    return CODEC_ZSTD, packed


def decompress_frame(frame, data, base: int, number: int, crypto, pack_key: str) -> bytes:
    """Raw bytes of frame `number` (a FRAME_DTYPE record) of pack `pack_key` out of
    `data`, the pack's bytes from offset `base` on, unsealed with `crypto` (a
    NoEncryption or Encryption); ValueError when it is damaged."""
    start = int(frame["offset"]) - base
    payload = memoryview(data)[start:start + int(frame["clen"])]
    payload = crypto.unseal(payload, frame_context(pack_key, number))
    return decompress(int(frame["codec"]), payload, int(frame["rlen"]), f"frame {number}")


def decompress(codec: int, payload, raw_size: int, what: str) -> bytes:
    """The frame's raw bytes; ValueError with a reason when the payload is damaged."""
    if codec == CODEC_RAW:
        if len(payload) != raw_size:
            raise ValueError(f"{what}: stored frame has {len(payload)} bytes, expected {raw_size}")
        return bytes(payload)
    if codec != CODEC_ZSTD:
        raise ValueError(f"{what}: unknown codec {codec}")
    try:
        out = _decompressor().decompress(payload, max_output_size=raw_size)
    except zstandard.ZstdError as e:
        raise ValueError(f"{what}: zstd frame does not decode ({e})") from None
    if len(out) != raw_size:
        raise ValueError(f"{what}: frame decodes to {len(out)} bytes, expected {raw_size}")
    return out
