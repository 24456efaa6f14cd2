"""VMM test helpers. The `kvm` marker (skip, with the reason, where /dev/kvm is
missing or not accessible) and the `testguest` fixture come from tests/conftest.py."""

from __future__ import annotations

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

