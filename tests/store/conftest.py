"""Fixtures for the store tests: one conformance suite over every backend.

S3 runs against a real server: the one named by SNAPVISOR_TEST_S3_ENDPOINT (with
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), or, with SNAPVISOR_TEST_S3_AUTOSTART=1,
a `weed mini` this session starts through .ci/s3-server. moto adds a fast S3
fixture that runs everywhere; it never replaces the real server.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
from pathlib import Path

import moto  # noqa: F401  (first: moto hooks only boto3 sessions created after its import)
import pytest

from snapvisor.store import Repository, open_backend
from snapvisor.store.memory import MemoryStore
from store_helpers import SMALL_REPO, s3_options

REPO_ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ["memory", "local", pytest.param("s3", marks=pytest.mark.s3)]


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
    started = subprocess.run([script, "start"], env=env, capture_output=True, text=True,
                             timeout=120)
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


@pytest.fixture
def moto_s3():
    from moto import mock_aws

    with mock_aws():
        import boto3

        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="moto-bucket")
        yield


def s3_factory(kind: str, request):
    """A function making S3 stores on fresh prefixes of moto or of the real server."""
    if kind == "moto":
        request.getfixturevalue("moto_s3")
        bucket, base = "moto-bucket", {"region": "us-east-1", "access_key": "testing",
                                       "secret_key": "testing"}
    else:
        bucket = request.getfixturevalue("s3_bucket")
        base = s3_options(request.getfixturevalue("s3_server"))
    made = []

    def make(**options):
        store = open_backend(f"s3://{bucket}/{secrets.token_hex(6)}", **base, **options)
        made.append(store)
        return store

    return make, made


def _open_backend(kind: str, request, tmp_path):
    if kind == "memory":
        url = f"memory://{request.node.name}-{secrets.token_hex(4)}"
        yield open_backend(url)
        MemoryStore.forget(url)
    elif kind == "local":
        yield open_backend(str(tmp_path / "repo"))
    else:
        make, made = s3_factory(kind, request)
        yield make()
        for store in made:
            store.close()


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    """A fresh, empty ObjectStore of each real kind: memory, local directory, S3 server."""
    yield from _open_backend(request.param, request, tmp_path)


@pytest.fixture(params=BACKENDS + ["moto"])
def any_backend(request, tmp_path):
    """The backends above plus moto: a fast S3 stand-in for the object store conformance."""
    yield from _open_backend(request.param, request, tmp_path)


@pytest.fixture
def repo(backend):
    """A repository with small packs, frames and map blocks so small images exercise them."""
    return Repository.init(backend, **SMALL_REPO, lock_wait=2.0)


@pytest.fixture(params=["moto", pytest.param("s3", marks=pytest.mark.s3)])
def make_s3_store(request):
    """Build S3 stores with custom options (moto, and the real server when there is one)."""
    make, made = s3_factory(request.param, request)
    yield make
    for store in made:
        store.close()
