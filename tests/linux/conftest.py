"""Fixtures for the Linux boot tests: Debian's cloud kernel, fetched once and
cached (the `kvm` marker is handled by tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from debian_kernel import KernelUnavailable, extract_vmlinux, fetch_bzimage


@pytest.fixture(scope="session")
def debian_bzimage() -> Path:
    try:
        return fetch_bzimage()
    except KernelUnavailable as exc:
        pytest.skip(f"Debian's cloud kernel is not available here: {exc}")


@pytest.fixture(scope="session")
def debian_vmlinux(debian_bzimage: Path) -> Path:
    return extract_vmlinux(debian_bzimage)
