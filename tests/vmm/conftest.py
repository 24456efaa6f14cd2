"""VMM test helpers. The `kvm` marker (skip, with the reason, where /dev/kvm is
missing or not accessible) and the `testguest` fixture come from tests/conftest.py."""

from __future__ import annotations

import io
import time

import pytest

from snapvisor.vmm.errors import KvmUnavailableError
from snapvisor.vmm.kvm import Kvm


@pytest.fixture
def kvm() -> Kvm:
    """An open /dev/kvm system object."""
    try:
        handle = Kvm.open()
    except KvmUnavailableError as exc:
        pytest.skip(f"needs /dev/kvm: {exc}")
    yield handle
    handle.close()


def wait_for_output(buffer: io.BytesIO, needle: bytes, timeout: float) -> bytes:
    """Poll a serial BytesIO until `needle` appears; returns everything so far."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = buffer.getvalue()
        if needle in data:
            return data
        time.sleep(0.005)
    raise AssertionError(f"{needle!r} did not appear within {timeout} s; serial so far: {buffer.getvalue()!r}")
