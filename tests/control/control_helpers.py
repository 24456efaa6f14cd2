"""Helpers for the control API tests: raw HTTP over the Unix socket (to send what
a well-behaved client never would) and the guest console readers of tests/snapshot."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "snapshot"))

from guest_console import assert_healthy, last_rounds, rounds, wait_for_rounds  # noqa: E402
from testsupport import wait_until

__all__ = ["assert_healthy", "last_rounds", "rounds", "wait_for_rounds", "raw_request", "wait_until"]




def raw_request(path: str, request: bytes, timeout: float = 15.0) -> tuple[int, dict | None]:
    """Send `request` bytes as they are; (HTTP status, decoded JSON body or None)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else None


def put(path: str, endpoint: str, body: bytes, extra_headers: str = "") -> tuple[int, dict | None]:
    headers = f"PUT {endpoint} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra_headers}\r\n"
    return raw_request(path, headers.encode() + body)


def put_json(path: str, endpoint: str, value: object) -> tuple[int, dict | None]:
    return put(path, endpoint, json.dumps(value).encode())
