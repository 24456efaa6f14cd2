"""Fixtures for the store tests: one conformance suite over every backend.

S3 runs against the real server of tests/conftest.py's `s3_server` fixture. moto
adds a fast S3 fixture that runs everywhere; it never replaces the real server.
"""

from __future__ import annotations

import secrets

import moto  # noqa: F401  (first: moto hooks only boto3 sessions created after its import)
import pytest

from snapvisor.store import Repository, open_backend
from snapvisor.store.memory import MemoryStore
from store_helpers import SMALL_REPO, TEST_PASSWORD
from testsupport import s3_options

BACKENDS = ["memory", "local", pytest.param("s3", marks=pytest.mark.s3)]


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


ENCRYPTIONS = ["plain", "encrypted"]


@pytest.fixture(params=ENCRYPTIONS)
def repo(backend, request):
    """A repository with small packs, frames and map blocks so small images exercise
    them: unencrypted, and encrypted (every repository-level test runs on both)."""
    password = TEST_PASSWORD if request.param == "encrypted" else None
    return Repository.init(backend, password=password, **SMALL_REPO, lock_wait=2.0)


@pytest.fixture(params=["moto", pytest.param("s3", marks=pytest.mark.s3)])
def make_s3_store(request):
    """Build S3 stores with custom options (moto, and the real server when there is one)."""
    make, made = s3_factory(request.param, request)
    yield make
    for store in made:
        store.close()
