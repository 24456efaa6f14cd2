"""Helpers shared by test directories (a module with a unique name: every test
directory is on sys.path, so a second `conftest` import would be ambiguous)."""

from __future__ import annotations


def s3_options(s3_server: tuple[str, str, str]) -> dict:
    """Repository.open_url keyword arguments for the `s3_server` fixture's server."""
    endpoint, key, secret = s3_server
    return {"endpoint_url": endpoint, "access_key": key, "secret_key": secret}
