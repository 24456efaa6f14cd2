"""Fixtures for the Linux boot tests: /dev/kvm and Debian's cloud kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from debian_kernel import KernelUnavailable, extract_vmlinux, fetch_bzimage
from snapvisor.vmm.errors import KvmUnavailableError
from snapvisor.vmm.kvm import Kvm


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kvm"):
        try:
            Kvm.open().close()
        except KvmUnavailableError as exc:
            pytest.skip(f"needs /dev/kvm: {exc}")


@pytest.fixture(scope="session")
def debian_bzimage() -> Path:
    try:
        return fetch_bzimage()
    except KernelUnavailable as exc:
        pytest.skip(f"Debian's cloud kernel is not available here: {exc}")


@pytest.fixture(scope="session")
def debian_vmlinux(debian_bzimage: Path) -> Path:
    return extract_vmlinux(debian_bzimage)
