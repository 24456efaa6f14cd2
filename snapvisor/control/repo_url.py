"""Repository URLs an API caller may name, checked before anything opens them.

A URL that cannot work is refused here with a 400 naming the fix, rather than
failing later inside the store as if the store were down (a 502) or, worse,
working: a "repository" at /dev/null or /proc/self/mem is a kernel interface,
and `s3://../../x` names no bucket S3 could hold.
"""

from __future__ import annotations

import ipaddress
import os
import re

from snapvisor.control.errors import BadRequest

MAX_URL = 1024
# S3's bucket naming rules: 3 to 63 lowercase letters, digits, dots and hyphens,
# a letter or digit at each end, no two dots in a row, not an IPv4 address.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# Kernel interfaces, not storage.
SYSTEM_TREES = ("/dev", "/proc", "/sys")
FORMS = "an absolute path, file:///path or s3://bucket/prefix"


def validate_repo_url(url: object) -> str:
    """`url` if it can name a repository: {FORMS}, each part well formed."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL or not url.isprintable():
        raise BadRequest(f"repo must be a non-empty string of at most {MAX_URL} printable characters")
    if url.startswith("s3://"):
        _check_s3(url)
    elif url.startswith("/") or url.startswith("file:///"):
        _check_local(url, url.removeprefix("file://"))
    else:
        raise BadRequest(f"repo {url!r} must be {FORMS}")
    return url


def _check_s3(url: str) -> None:
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _is_ipv4(bucket):
        raise BadRequest(f"repo {url!r}: {bucket!r} is not an S3 bucket name (3 to 63 lowercase letters, "
                         f"digits, dots and hyphens); write s3://bucket/prefix")
    parts = prefix.rstrip("/").split("/") if prefix.rstrip("/") else []
    if any(part in ("", ".", "..") for part in parts):
        raise BadRequest(f"repo {url!r}: the prefix may not hold '.', '..' or '//'; write s3://bucket/a/b")


def _is_ipv4(name: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(name), ipaddress.IPv4Address)
    except ValueError:
        return False


def _check_local(url: str, path: str) -> None:
    canonical = os.path.normpath(path)
    if (path.rstrip("/") or "/") != canonical or canonical.startswith("//"):
        raise BadRequest(f"repo {url!r}: write the path without '.', '..' or '//' (e.g. {canonical!r})")
    real = os.path.realpath(canonical)
    for candidate in (canonical, real):
        tree = next((t for t in SYSTEM_TREES if candidate == t or candidate.startswith(t + "/")), None)
        if tree is not None:
            raise BadRequest(f"repo {url!r} is under {tree}, which holds kernel interfaces, not storage; "
                             f"choose a directory on a disk")
    if os.path.exists(real) and not os.path.isdir(real):
        raise BadRequest(f"repo {url!r} exists and is not a directory; a local repository is a directory")
