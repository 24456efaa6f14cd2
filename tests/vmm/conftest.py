"""Fixtures for the VMM tests: real /dev/kvm (tests marked `kvm` skip, with the
reason, only where it is missing or not accessible) and the real test guest."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from snapvisor.vmm.errors import KvmUnavailableError
from snapvisor.vmm.kvm import Kvm


def _kvm_unavailable_reason() -> str | None:
    try:
        Kvm.open().close()
    except KvmUnavailableError as exc:
        return str(exc)
    return None


_UNAVAILABLE = _kvm_unavailable_reason()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kvm") and _UNAVAILABLE:
        pytest.skip(f"needs /dev/kvm: {_UNAVAILABLE}")


@pytest.fixture
def kvm() -> Kvm:
    if _UNAVAILABLE:
        pytest.skip(f"needs /dev/kvm: {_UNAVAILABLE}")
    handle = Kvm.open()
    yield handle
    handle.close()


@pytest.fixture(scope="session")
def testguest() -> Path:
    from snapvisor import testguest as builder

    return builder.build()


def wait_for_output(buffer: io.BytesIO, needle: bytes, timeout: float) -> bytes:
    """Poll a serial BytesIO until `needle` appears; returns everything so far."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = buffer.getvalue()
        if needle in data:
            return data
        time.sleep(0.005)
    raise AssertionError(f"{needle!r} did not appear within {timeout} s; serial so far: {buffer.getvalue()!r}")
