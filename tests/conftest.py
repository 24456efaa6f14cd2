"""Fixtures shared by every test directory.

- `kvm` marker: VM tests need a usable /dev/kvm; where it is missing or not
  accessible they skip, saying why. They never pass without running.
- `linux` marker: Linux guests at work need a hardware-style KVM; they run in the
  lab (`scripts/lab test`, which sets SNAPVISOR_LAB_DIR) and are deselected
  everywhere else, so the main suite neither runs nor lists them as skipped.
- `testguest`: the project's own test guest, built once per session (into the
  session's own cache directory, SNAPVISOR_CACHE).
- `s3_server` / `s3_bucket`: a real S3 server (SeaweedFS). `.ci/run` starts one and
  exports SNAPVISOR_TEST_S3_ENDPOINT, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY;
  locally, SNAPVISOR_TEST_S3_AUTOSTART=1 makes the session start its own.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _kvm_unavailable_reason() -> str | None:
    from snapvisor.vmm.errors import KvmUnavailableError
    from snapvisor.vmm.kvm import Kvm

    try:
        Kvm.open().close()
    except KvmUnavailableError as exc:
        return str(exc)
    return None


KVM_UNAVAILABLE = _kvm_unavailable_reason()


def pytest_configure(config: pytest.Config) -> None:
    # Local caches (the built test guest, decoded repository indexes) live in a
    # directory of this session: no test reads what an earlier run left behind, and
    # the thousands of throw-away repositories leave nothing in ~/.cache.
    if "SNAPVISOR_CACHE" not in os.environ:
        config._snapvisor_cache = tempfile.TemporaryDirectory(prefix="snapvisor-test-cache-")
        os.environ["SNAPVISOR_CACHE"] = config._snapvisor_cache.name


def pytest_unconfigure(config: pytest.Config) -> None:
    cache = getattr(config, "_snapvisor_cache", None)
    if cache is not None:
        del os.environ["SNAPVISOR_CACHE"]
        cache.cleanup()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("SNAPVISOR_LAB_DIR"):
        return
    lab_only = [item for item in items if item.get_closest_marker("linux")]
    if lab_only:
        config.hook.pytest_deselected(items=lab_only)
        items[:] = [item for item in items if not item.get_closest_marker("linux")]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kvm") and KVM_UNAVAILABLE:
        pytest.skip(f"needs /dev/kvm: {KVM_UNAVAILABLE}")


@pytest.fixture(scope="session")
def testguest() -> Path:
    from snapvisor import testguest as builder

    return builder.build()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """(endpoint, access key, secret key) of a real S3 server, or skip."""
    endpoint = os.environ.get("SNAPVISOR_TEST_S3_ENDPOINT")
    if endpoint:
        yield endpoint, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        return
    if os.environ.get("SNAPVISOR_TEST_S3_AUTOSTART") != "1":
        pytest.skip("real S3 tests need SNAPVISOR_TEST_S3_ENDPOINT (run `.ci/s3-server start` and "
                    "source the env file it prints) or SNAPVISOR_TEST_S3_AUTOSTART=1")
    state = tmp_path_factory.mktemp("s3-server")
    env = dict(os.environ, SNAPVISOR_S3_DIR=str(state))
    script = str(REPO_ROOT / ".ci" / "s3-server")
    started = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=120)
    if started.returncode:
        pytest.fail(f".ci/s3-server start failed:\n{started.stdout}\n{started.stderr}")
    values = {}
    for line in Path(started.stdout.strip().splitlines()[-1]).read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        values[name] = shlex.split(value)[0]
    try:
        yield (values["SNAPVISOR_TEST_S3_ENDPOINT"], values["AWS_ACCESS_KEY_ID"],
               values["AWS_SECRET_ACCESS_KEY"])
    finally:
        subprocess.run([script, "stop"], env=env, timeout=60)


@pytest.fixture(scope="session")
def s3_bucket(s3_server):
    """A fresh bucket on the real server for this session."""
    import boto3
    import botocore.config

    endpoint, key, secret = s3_server
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=key, aws_secret_access_key=secret,
                          config=botocore.config.Config(s3={"addressing_style": "path"}))
    bucket = "snapvisor-test-" + secrets.token_hex(4)
    client.create_bucket(Bucket=bucket)
    return bucket
