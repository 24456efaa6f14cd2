"""Helpers shared by test directories (a module with a unique name: every test
directory is on sys.path, so a second `conftest` import would be ambiguous)."""

from __future__ import annotations

import io
import time


def s3_options(s3_server: tuple[str, str, str]) -> dict:
    """Repository.open_url keyword arguments for the `s3_server` fixture's server."""
    endpoint, key, secret = s3_server
    return {"endpoint_url": endpoint, "access_key": key, "secret_key": secret}


def wait_for_output(buffer: io.BytesIO, needle: bytes, timeout: float) -> bytes:
    """Poll a serial BytesIO until `needle` appears; returns everything so far."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = buffer.getvalue()
        if needle in data:
            return data
        time.sleep(0.005)
    raise AssertionError(f"{needle!r} did not appear within {timeout} s; serial so far: {buffer.getvalue()!r}")
