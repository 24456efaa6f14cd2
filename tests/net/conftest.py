"""Fixtures for the virtio-net tests: "hosts" (network namespaces holding taps),
removed again also when a test fails. Tests that need them skip, saying why,
where there is no root, no `ip` or no /dev/net/tun."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest

from netlab import TapHost, net_unavailable

NET_UNAVAILABLE = "`ip` is missing" if shutil.which("ip") is None else net_unavailable()


@pytest.fixture
def tap_hosts(tmp_path: Path) -> Iterator[Callable[[str], TapHost]]:
    """make(label) -> a new namespace; all of them are deleted at the end."""
    if NET_UNAVAILABLE:
        pytest.skip(f"needs taps in network namespaces: {NET_UNAVAILABLE}")
    made: list[TapHost] = []

    def make(label: str) -> TapHost:
        made.append(TapHost(tmp_path, label))
        return made[-1]

    yield make
    for host in made:
        host.close()
