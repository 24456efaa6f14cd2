"""The control API on the wire: the HTTP/1.x subset it speaks, read and written
here so that whatever bytes arrive, the answer is a status line and a JSON body.

http.server answers malformed requests with an HTML page, a request line without
a version with no status line at all, and unknown methods with 501; it bounds
each read but not a whole request, so a client trickling bytes keeps its thread
for ever. Here a request (line, headers, body) must arrive within one deadline,
every limit is checked before anything is buffered, and a JSON body is parsed
without recursion limits being reachable and with numbers kept finite.
"""

from __future__ import annotations

import io
import json
import math
import re
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus

from snapvisor.control.errors import BadRequest, ControlError, PayloadTooLarge, RequestTimeout, shown
from snapvisor.humanize import parse_duration

MAX_LINE = 8192          # bytes in the request line or one header line
MAX_HEADERS = 64
MAX_JSON_DEPTH = 8       # the API's bodies nest 2 deep ({"keep": {"last": 3}})
MAX_JSON_INT = 2 ** 63   # beyond any count, size or duration the API takes
MAX_DURATION_TEXT = 32   # '1h30m', '2d': a longer text is no duration
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: methods, header names
VERSIONS = ("HTTP/1.0", "HTTP/1.1")
SEND_TIMEOUT_S = 5.0     # a client that does not read its answer is dropped
LINGER_S = 2.0           # how long the rest of a refused request is read and dropped
LINGER_BYTES = 1 << 20


class ClientGone(Exception):
    """The client closed the connection before sending a request: nothing to answer."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str                 # without the query string or a trailing slash
    headers: dict[str, str]   # lower-case names


class _DeadlineSocket(io.RawIOBase):
    """A socket's bytes, each read bounded by what is left of one deadline: a
    client that stalls and one that trickles a byte at a time are dropped alike."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self._sock = sock
        self._deadline = time.monotonic() + timeout_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class RequestReader:
    """Reads one request from a connection within `timeout_s` (head and body)."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._file = io.BufferedReader(_DeadlineSocket(sock, timeout_s))

    def head(self) -> Request:
        """The request line and headers; ClientGone if the client sent nothing."""
        line = self._line("the request line", 414)
        if not line:
            raise ClientGone
        text = line.decode("latin-1").rstrip("\r\n")
        parts = text.split(" ")
        method, target, version = parts if len(parts) == 3 else ("", "", "")
        if not (_TOKEN.fullmatch(method) and target.startswith("/") and version in VERSIONS):
            raise BadRequest(f"the request line {shown(text)} is not HTTP/1.0 or 1.1; send "
                             f"'METHOD /path HTTP/1.1' (curl --unix-socket SOCKET http://localhost/vm)")
        headers: dict[str, str] = {}
        while (line := self._line("a header line", 431)) not in (b"\r\n", b"\n"):
            if not line:
                raise BadRequest("the request ended inside its headers; end them with an empty line")
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not _TOKEN.fullmatch(name):
                raise BadRequest(f"the header line {shown(line.decode('latin-1').rstrip())} is not 'Name: value'")
            name, value = name.lower(), value.strip()
            if headers.get(name, value) != value:
                raise BadRequest(f"the header {name} is given twice with different values")
            headers[name] = value
            if len(headers) > MAX_HEADERS:
                raise ControlError(f"the request has more than {MAX_HEADERS} headers", 431)
        return Request(method, target.split("?", 1)[0].rstrip("/") or "/", headers)

    def json_body(self, request: Request, limit: int) -> dict:
        """The JSON object a PUT carries (Content-Length, at most `limit` bytes)."""
        if "transfer-encoding" in request.headers:
            raise ControlError("send the body with a Content-Length, not chunked", 411)
        length_text = request.headers.get("content-length")
        if length_text is None:
            raise ControlError(f"a {request.method} needs a JSON body with a Content-Length", 411)
        if not (length_text.isascii() and length_text.isdigit()):
            raise BadRequest(f"Content-Length {shown(length_text)} is not a number of bytes")
        digits = length_text.lstrip("0") or "0"
        if len(digits) > len(str(limit)) or int(digits) > limit:
            raise PayloadTooLarge(f"the body is {shown(digits)} bytes; the API takes at most {limit}")
        length = int(digits)
        raw = self._read(length)
        if len(raw) != length:
            raise BadRequest(f"the body ended after {len(raw)} of {length} bytes")
        return parse_json_object(raw)

    def _line(self, what: str, too_long_status: int) -> bytes:
        line = self._read_with_deadline(lambda: self._file.readline(MAX_LINE + 1))
        if len(line) > MAX_LINE:
            raise ControlError(f"{what} is longer than {MAX_LINE} bytes", too_long_status)
        return line

    def _read(self, size: int) -> bytes:
        return self._read_with_deadline(lambda: self._file.read(size))

    def _read_with_deadline(self, read) -> bytes:
        try:
            return read()
        except TimeoutError:
            raise RequestTimeout(f"the request did not arrive whole within {self.timeout_s:g} s; "
                                 f"the connection is closed, send it again at once") from None
        except ConnectionError:
            raise ClientGone from None


def parse_json_object(raw: bytes) -> dict:
    """A JSON object of finite numbers nested at most MAX_JSON_DEPTH deep."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float,
                          parse_int=_bounded_int)
    except RecursionError:
        raise BadRequest(f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if _depth(body) > MAX_JSON_DEPTH:
        raise BadRequest(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    return body


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{shown(text)} is too large a number")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > len(str(MAX_JSON_INT)) or abs(value := int(text)) > MAX_JSON_INT:
        raise ValueError(f"{shown(text)} is too large a number")
    return value


def _depth(value: object) -> int:
    """How deep `value` nests, found without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def duration_from_json(field: str, value: object) -> float:
    """Seconds from a duration field: a string such as '15m', or a number."""
    if isinstance(value, str):
        try:
            if len(value) > MAX_DURATION_TEXT:
                raise ValueError(f"{shown(value)} is not a duration (examples: 30s, 15m, 1h30m, 2d)")
            return parse_duration(value)
        except ValueError as exc:
            raise BadRequest(f"{field}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{field} must be a duration string ('15m') or a number of seconds")
    try:
        return float(value)
    except OverflowError:
        raise BadRequest(f"{field} {shown(value)} is out of range") from None


def send_answer(sock: socket.socket, status: int, answer: dict | None, headers: dict[str, str] | None = None) -> None:
    """One HTTP/1.0 answer with a JSON body (none for 204); the connection closes after it."""
    data = b"" if answer is None else json.dumps(answer).encode() + b"\n"
    lines = [f"HTTP/1.0 {status} {HTTPStatus(status).phrase}", f"Content-Length: {len(data)}", "Connection: close"]
    if answer is not None:
        lines.append("Content-Type: application/json")
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    try:
        sock.settimeout(SEND_TIMEOUT_S)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
    except OSError:
        pass  # the client went away; nothing to tell it


def linger(sock: socket.socket) -> None:
    """End our side, then read and drop what the client still sends (the body of a
    request refused early, up to LINGER_BYTES for LINGER_S): a Unix socket closed
    with unread bytes resets the connection, and the client loses the answer."""
    deadline = time.monotonic() + LINGER_S
    dropped = 0
    try:
        sock.shutdown(socket.SHUT_WR)
        while dropped < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                return
            dropped += len(chunk)
    except OSError:
        pass  # gone, or still sending after the grace: the answer was given
