"""S3 failures end in a clear StoreError, bounded in time; against the real server."""

import socket
import time

import pytest

from snapvisor.store import Repository, StoreError, open_backend

from testsupport import s3_options


@pytest.mark.s3
def test_wrong_bucket(s3_server):
    store = open_backend("s3://snapvisor-no-such-bucket/repo", **s3_options(s3_server))
    with pytest.raises(StoreError, match="bucket 'snapvisor-no-such-bucket' does not exist"):
        Repository.open(store)
    with pytest.raises(StoreError, match="does not exist"):
        Repository.init(store)


@pytest.mark.s3
def test_wrong_credentials(s3_server, s3_bucket):
    options = dict(s3_options(s3_server), secret_key="not-the-secret")
    store = open_backend(f"s3://{s3_bucket}/creds", **options)
    with pytest.raises(StoreError, match="access denied.*AWS_ACCESS_KEY_ID"):
        Repository.init(store)
    good = open_backend(f"s3://{s3_bucket}/creds", **s3_options(s3_server))
    assert list(good.list("")) == []  # nothing was written


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_is_bounded():
    store = open_backend("s3://bucket/repo", endpoint_url=f"http://127.0.0.1:{closed_port()}",
                         access_key="x", secret_key="y", max_attempts=2, connect_timeout=1)
    start = time.monotonic()
    with pytest.raises(StoreError, match="cannot reach the endpoint after 2 attempts"):
        Repository.open(store)
    assert time.monotonic() - start < 15


def test_blackholed_endpoint_times_out():
    # 192.0.2.0/24 is TEST-NET-1: packets go nowhere, so only the timeout ends the call.
    store = open_backend("s3://bucket/repo", endpoint_url="http://192.0.2.1:9",
                         access_key="x", secret_key="y", max_attempts=2, connect_timeout=0.5)
    start = time.monotonic()
    with pytest.raises(StoreError, match="cannot reach"):
        store.get("config")
    assert time.monotonic() - start < 10


def test_profile_not_found():
    with pytest.raises(StoreError, match="profile 'no-such-profile' not found"):
        open_backend("s3://bucket/repo", profile="no-such-profile")


@pytest.mark.s3
def test_endpoint_from_environment(monkeypatch, s3_server, s3_bucket):
    endpoint, key, secret = s3_server
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    repo = Repository.open_url(f"s3://{s3_bucket}/from-env", create=True)
    assert Repository.open_url(f"s3://{s3_bucket}/from-env").config["id"] == repo.config["id"]
