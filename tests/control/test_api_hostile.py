"""No request may produce a 500, an HTML page or silence: hostile and malformed
requests sent on a raw socket to a real VM's API, each answered with a 4xx status
line and a JSON error, the VM untouched and the server answering GET /vm after
each. The classes: request lines, headers, bodies, methods and paths, a wrong
JSON value for every field of every endpoint, a bad repository URL for every field
that takes one, requests that stall or trickle, and bursts of connections."""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import snapvisor
from control_helpers import assert_healthy, wait_for_rounds
from snapvisor.control import ApiClient, serve
from snapvisor.control.api import MAX_CONNECTIONS, REQUEST_TIMEOUT_S

pytestmark = pytest.mark.kvm

CMDLINE = "console=ttyS0 tg.mem=8 tg.rate=10 tg.pages=256 tg.rounds=0"


@dataclass
class Served:
    vm: snapvisor.VM
    out: io.BytesIO
    sock: str
    dir: Path  # a directory for repositories and the files the URL cases need


@pytest.fixture(scope="module")
def served(testguest: Path, tmp_path_factory):
    out = io.BytesIO()
    vm = snapvisor.VM.boot(testguest, mem="64M", cmdline=CMDLINE, serial_out=out, name="hostile")
    work = tmp_path_factory.mktemp("hostile")
    (work / "a-file").write_text("not a directory")
    (work / "link-to-proc").symlink_to("/proc/self")
    sock = work / "api.sock"
    try:
        with serve(vm, api_sock=sock):
            wait_for_rounds(out, 1, 1)
            yield Served(vm, out, str(sock), work)
        assert_healthy(out.getvalue())
    finally:
        vm.close()


def exchange(sock_path: str, data: bytes, *, close_write: bool = True, timeout: float = 15.0) -> bytes:
    """Send `data` as it is and read until the server closes; the raw answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(sock_path)
        try:
            sock.sendall(data)
            if close_write:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before reading it all (413): the answer is there
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def json_error(answer: bytes) -> tuple[int, str]:
    """(status, error message) of an answer that must be a status line, a JSON
    Content-Type and a JSON {"error": ...} body."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.") and len(lines[0].split(" ")) >= 3, answer[:200]
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers.get("content-type") == "application/json", answer[:200]
    assert int(headers["content-length"]) == len(body), answer[:200]
    decoded = json.loads(body)
    assert set(decoded) == {"error"} and isinstance(decoded["error"], str) and decoded["error"], decoded
    return status, decoded["error"]


def assert_untouched(served: Served) -> None:
    """The server answers, the VM runs, nothing was scheduled or started."""
    info = ApiClient(served.sock, timeout=5).vm()
    assert info["state"] == "Running" and info["schedule"]["enabled"] is False, info
    assert info["last_snapshot"] is None, info
    assert served.vm.vm.running


def put(endpoint: str, body: bytes) -> bytes:
    return f"PUT {endpoint} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


# -- raw requests: (id, bytes, expected status) --------------------------------------

RAW = [
    ("empty line", b"\r\n", 400),
    ("no version (HTTP/0.9)", b"GET /vm\r\n\r\n", 400),
    ("method only", b"GET\r\n\r\n", 400),
    ("not http", b"hello there\r\n\r\n", 400),
    ("tls hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(32), 400),
    ("nul bytes", b"\x00" * 100, 400),
    ("binary line", b"GET /vm HTTP/1.1\xff\xfe\r\n\r\n", 400),
    ("http/2", b"GET /vm HTTP/2.0\r\n\r\n", 400),
    ("http/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    ("four words", b"GET /vm HTTP/1.1 extra\r\n\r\n", 400),
    ("double space", b"GET  /vm HTTP/1.1\r\n\r\n", 400),
    ("relative target", b"GET vm HTTP/1.1\r\n\r\n", 400),
    ("absolute target", b"GET http://localhost/vm HTTP/1.1\r\n\r\n", 400),
    ("non-token method", "GÉT /vm HTTP/1.1\r\n\r\n".encode(), 400),
    ("line too long", b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n", 414),
    ("ends after the line", b"GET /vm HTTP/1.1", 400),
    ("ends in the headers", b"GET /vm HTTP/1.1\r\nHost: x\r\n", 400),
    ("header without colon", b"GET /vm HTTP/1.1\r\nNoColon\r\n\r\n", 400),
    ("space before colon", b"PUT /vm/state HTTP/1.1\r\nContent-Length : 2\r\n\r\n{}", 400),
    ("folded header", b"GET /vm HTTP/1.1\r\nX: a\r\n b\r\n\r\n", 400),
    ("header too long", b"GET /vm HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n", 431),
    ("too many headers", b"GET /vm HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(100)) + b"\r\n", 431),
    ("two lengths", b"PUT /vm/state HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 20\r\n\r\n{}", 400),
    ("no length", b"PUT /vm/state HTTP/1.1\r\n\r\n", 411),
    ("chunked", b"PUT /vm/state HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    ("length not a number", b"PUT /vm/state HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400),
    ("negative length", b"PUT /vm/state HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    ("signed length", b"PUT /vm/state HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}", 400),
    ("float length", b"PUT /vm/state HTTP/1.1\r\nContent-Length: 2.0\r\n\r\n{}", 400),
    ("huge length", b"PUT /vm/state HTTP/1.1\r\nContent-Length: " + b"9" * 40 + b"\r\n\r\n", 413),
    ("5000-digit length", b"PUT /vm/state HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 413),
    ("non-ascii digit length", b"PUT /vm/state HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n{}", 400),
    ("zero-padded length", b"PUT /vm/state HTTP/1.1\r\nContent-Length: " + b"0" * 30 + b"2\r\n\r\n{}", 400),
    ("too big", b"PUT /snapshot HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n", 413),
    ("short body", b"PUT /vm/state HTTP/1.1\r\nContent-Length: 50\r\n\r\n{}", 400),
    ("not json", put("/vm/state", b"Pause"), 400),
    ("not utf-8", put("/vm/state", b"\xff\xfe"), 400),
    ("json array", put("/vm/state", b"[]"), 400),
    ("json string", put("/vm/state", b'"Paused"'), 400),
    ("json null", put("/vm/state", b"null"), 400),
    ("deep arrays", put("/vm/state", b"[" * 60000 + b"]" * 60000), 413),
    ("deep arrays within the limit", put("/vm/state", b"[" * 30000 + b"]" * 30000), 400),
    ("deep objects", put("/vm/state", b'{"a":' * 5000 + b"1" + b"}" * 5000), 400),
    ("nested a little too deep", put("/schedule", b'{"keep":' * 9 + b"{}" + b"}" * 9), 400),
    ("deep value", put("/vm/state", b'{"state": ' + b"[" * 900 + b"]" * 900 + b"}"), 400),
    ("NaN", put("/migrate", b'{"to": "127.0.0.1:1", "downtime_ms": NaN}'), 400),
    ("Infinity", put("/schedule", b'{"every": Infinity, "repos": ["/tmp/r"]}'), 400),
    ("1e999", put("/schedule", b'{"every": 1e999, "repos": ["/tmp/r"]}'), 400),
    ("a 400-digit number", put("/schedule", b'{"every": 1' + b"0" * 400 + b', "repos": ["/tmp/r"]}'), 400),
    ("a 5000-digit number", put("/schedule", b'{"every": 1' + b"0" * 5000 + b', "repos": ["/tmp/r"]}'), 400),
    ("duplicate keys", put("/vm/state", b'{"state": "Resumed", "state": "Frozen"}'), 400),
    ("unknown method", b"BREW /vm HTTP/1.1\r\n\r\n", 405),
    ("DELETE", b"DELETE /vm HTTP/1.1\r\n\r\n", 405),
    ("POST", b"POST /snapshot HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 405),
    ("PATCH", b"PATCH /schedule HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 405),
    ("OPTIONS", b"OPTIONS /vm HTTP/1.1\r\n\r\n", 405),
    ("HEAD", b"HEAD /vm HTTP/1.1\r\n\r\n", 405),
    ("GET a PUT endpoint", b"GET /snapshot HTTP/1.1\r\n\r\n", 405),
    ("unknown path", b"GET /nope HTTP/1.1\r\n\r\n", 404),
    ("long path", b"GET /" + b"x" * 8000 + b" HTTP/1.1\r\n\r\n", 404),
    ("long method", b"X" * 8000 + b" /vm HTTP/1.1\r\n\r\n", 405),
    ("latin-1 path", b"GET /vm\xe9 HTTP/1.1\r\n\r\n", 404),
    ("root", b"GET / HTTP/1.1\r\n\r\n", 404),
    ("below an endpoint", b"GET /vm/x HTTP/1.1\r\n\r\n", 404),
    ("dot segments", b"GET /../vm HTTP/1.1\r\n\r\n", 404),
    ("encoded path", b"GET /%76m HTTP/1.1\r\n\r\n", 404),
    ("unknown method, unknown path", b"BREW /pot HTTP/1.1\r\n\r\n", 404),
]


@pytest.mark.parametrize("request_bytes,status", [pytest.param(r, s, id=i) for i, r, s in RAW])
def test_raw_requests_get_a_json_4xx(served: Served, request_bytes: bytes, status: int) -> None:
    answered, message = json_error(exchange(served.sock, request_bytes))
    assert answered == status, message
    assert len(message) < 2000, message  # what was sent is not echoed whole
    assert_untouched(served)


# -- every field of every endpoint ---------------------------------------------------

# JSON values of each kind, as text; a field gets those of the kinds it does not take.
KIND_VALUES = {
    "null": ["null"],
    "bool": ["true", "false"],
    "number": ["0", "-1", "0.5", "3", "1e308", "-0.0"],
    "string": ['""', '"x"', '"1h"'],
    "array": ["[]", '["x"]', "[1]", "[[]]"],
    "object": ["{}", '{"x": 1}'],
}

BAD_URLS = [
    "", "relative/dir", "ftp://host/x", "memory://x", "http://example.com/x", "s3://", "s3:///x", "s3://../../x",
    "s3://b/x", "s3://Backups/x", "s3://bad_bucket/x", "s3://a..b/x", "s3://-bucket/x", "s3://192.168.0.1/x",
    "s3://bucket/../x", "s3://bucket/a//b", "s3://bucket/./x", "file://relative", "file:///tmp/../etc/x",
    "/tmp/./x", "/tmp//x", "/tmp/x/..", "/dev/null", "/dev", "/proc/self/mem", "/sys/kernel/x", "/x\x00y",
    "/x\ny", "/" + "a" * 1100, "{dir}/a-file", "{dir}/link-to-proc/mem", "file://{dir}/a-file",
]
BAD_TAG_LISTS = [[""], ["a b"], [1], [None], [["x"]], [{}], ["x" * 200], ["t"] * 17, ["../x"], ["a/b"]]


def _texts(values: list) -> list[str]:
    return [json.dumps(v) for v in values]


# (endpoint, field path, JSON kinds it takes, bad values of those kinds as JSON text)
FIELDS = [
    ("/vm/state", "state", {"string"}, _texts(["Frozen", "paused", "", "x" * 5000])),
    ("/snapshot", "repo", {"string"}, _texts(BAD_URLS)),
    ("/snapshot", "full", {"bool"}, []),
    ("/snapshot", "tags", {"array"}, _texts(BAD_TAG_LISTS)),
    ("/schedule", "every", {"string", "number"},
     _texts(["", "soon", "0s", "-5m", "1h-", "1e3", "9" * 400, "99999999999999d", "1h" * 5000, 0, -1, 0.1, 10 ** 12,
             1e308])),
    ("/schedule", "repos", {"array"},
     _texts([[], [1], [None], [["/tmp/r"]], ["{repo}", "{repo}"], [f"/tmp/r{i}" for i in range(9)]]
            + [[url] for url in BAD_URLS])),
    ("/schedule", "keep", {"object", "null"},
     _texts([{}, {"last": 0}, {"lots": 1}, {"within": 5}, {"last": 1, "x": {}}])),
    ("/schedule", "keep.last", {"number"}, _texts([-2, 1.5, 10 ** 7])),
    ("/schedule", "keep.within", {"string", "null"}, _texts(["", "soon", "0s", "99999999999999d", "9" * 400, "1d" * 5000])),
    ("/schedule", "tags", {"array"}, _texts(BAD_TAG_LISTS)),
    ("/actions", "action", {"string"}, _texts(["reboot", "", "SHUTDOWN", "x" * 5000])),
    ("/migrate", "to", {"string"},
     _texts(["", "host", "host:", ":7000", "h:0", "h:65536", "h:-1", "h:7000x", "[::1:7000", "a b:1",
             "h:" + "9" * 50, "x" * 5000])),
    ("/migrate", "downtime_ms", {"number"}, _texts([0, -1, 60001, 1e308])),
    ("/migrate", "max_time", {"number", "string"}, _texts([0, -1, 86401, 1e308, "", "soon", "2d", "0s", "9" * 400, "1s" * 5000])),
    ("/migrate", "auto_converge", {"bool"}, []),
    ("/migrate", "repo", {"string"}, _texts(BAD_URLS)),
]

# A valid body per endpoint; each case replaces one field with a bad value.
# (/migrate's receiver is a closed port: even a wrongly accepted request moves nothing.)
BASES = {
    "/vm/state": {"state": "Resumed"},
    "/snapshot": {"repo": "{repo}"},
    "/schedule": {"every": "1h", "repos": ["{repo}"], "keep": {"last": 3}, "tags": ["t"]},
    "/actions": {"action": "shutdown"},
    "/migrate": {"to": "127.0.0.1:1"},
}


def field_cases():
    for endpoint, field, takes, bad in FIELDS:
        others = [text for kind, texts in KIND_VALUES.items() if kind not in takes for text in texts]
        for text in others + bad:
            yield pytest.param(endpoint, field, text, id=f"{endpoint} {field}={text[:40]}")


def body_with(endpoint: str, field: str, value_text: str, served: Served) -> bytes:
    """BASES[endpoint] as JSON text with `field` (a.b: nested) set to the raw
    JSON `value_text`; {repo} and {dir} name the test's directories."""
    marker = "\x01value\x01"
    body = json.loads(json.dumps(BASES[endpoint]))
    parent, *rest = field.split(".")
    if rest:
        body[parent][rest[0]] = marker
    else:
        body[parent] = marker
    text = json.dumps(body).replace(json.dumps(marker), value_text)
    return text.replace("{repo}", str(served.dir / "repo")).replace("{dir}", str(served.dir)).encode()


@pytest.mark.parametrize("endpoint,field,value_text", list(field_cases()))
def test_a_bad_value_for_any_field_is_a_json_400(served: Served, endpoint: str, field: str,
                                                 value_text: str) -> None:
    answered, message = json_error(exchange(served.sock, put(endpoint, body_with(endpoint, field, value_text,
                                                                                  served))))
    assert answered == 400, message
    assert len(message) < 2000, message  # a huge value is not echoed whole
    assert_untouched(served)
    # A refused repository URL was not created.
    assert sorted(p.name for p in served.dir.iterdir() if p.name != "repo") == ["a-file", "api.sock",
                                                                               "link-to-proc"]


def test_a_schedule_whose_repository_does_not_open_is_refused(served: Served, s3_server, monkeypatch) -> None:
    """Well-formed URLs of repositories that cannot open: the schedule is refused
    with the reason (400) and nothing changes."""
    blocked = served.dir / "a-file" / "repo"
    bucketless = "s3://no-such-bucket-snapvisor/x"
    endpoint, key, secret = s3_server
    for name, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", key), ("AWS_SECRET_ACCESS_KEY", secret)):
        monkeypatch.setenv(name, value)
    for url, reason in [(str(blocked), "Not a directory"), (bucketless, "does not exist")]:
        body = json.dumps({"every": "1h", "repos": [str(served.dir / "repo"), url]}).encode()
        status, message = json_error(exchange(served.sock, put("/schedule", body)))
        assert status == 400 and f"cannot open repository {url}" in message and reason in message, message
        assert "the schedule was not changed" in message
        assert_untouched(served)


# -- requests that stall or trickle ------------------------------------------------------

STALLS = {
    "sends nothing": [],
    "half a request line": [b"GET /v"],
    "half the headers": [b"PUT /vm/state HTTP/1.1\r\nContent-Le"],
    "half the body": [b"PUT /vm/state HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"st"],
    # A byte every 0.4 s: each read is quick, the request never completes.
    "a trickle": [b"PUT /vm/state HTTP/1.1\r\nContent-Length: 100\r\n\r\n"] + [b" "] * 99,
}


def test_stalled_and_trickling_requests_get_408_and_are_closed(served: Served) -> None:
    """All at once: each gets a JSON 408 within the request deadline, then EOF."""
    outcomes: dict[str, tuple[float, bytes] | BaseException] = {}

    def client(name: str, pieces: list[bytes]) -> None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(REQUEST_TIMEOUT_S + 10)
                sock.connect(served.sock)
                started = time.monotonic()
                for index, piece in enumerate(pieces):
                    if index:
                        time.sleep(0.4)  # the client's pace is what is under test
                    try:
                        sock.sendall(piece)
                    except OSError:
                        break  # the server closed: its answer is waiting
                outcomes[name] = (time.monotonic() - started, read_all(sock))
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcomes[name] = exc

    clients = [threading.Thread(target=client, args=item) for item in STALLS.items()]
    for thread in clients:
        thread.start()
    # The server answers everyone else meanwhile.
    while any(thread.is_alive() for thread in clients):
        assert_untouched(served)
        time.sleep(0.5)
    for name in STALLS:
        outcome = outcomes[name]
        assert not isinstance(outcome, BaseException), (name, outcome)
        took, answer = outcome
        status, message = json_error(answer)
        assert status == 408 and "did not arrive whole" in message, (name, message)
        assert took < REQUEST_TIMEOUT_S + 3, (name, took)
    assert_untouched(served)


# -- bursts of connections ---------------------------------------------------------------

def test_a_burst_of_150_connections_is_served_and_get_vm_keeps_answering(served: Served) -> None:
    """150 clients connect at once (each with a timeout, as ApiClient does: a Unix
    socket then refuses a connect at once when the listen queue is full), each
    sends half a request and stalls; GET /vm answers within a second throughout,
    and every one of them gets its 408."""
    sockets = []
    try:
        for _ in range(150):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.settimeout(REQUEST_TIMEOUT_S + 10)
            sock.connect(served.sock)
        for sock in sockets:
            sock.sendall(b"PUT /vm/state HTTP/1.1\r\nContent-Length: 20\r\n\r\n{")
        slowest = 0.0
        deadline = time.monotonic() + REQUEST_TIMEOUT_S - 2
        while time.monotonic() < deadline:
            asked = time.monotonic()
            assert_untouched(served)
            slowest = max(slowest, time.monotonic() - asked)
            time.sleep(0.1)
        assert slowest < 1.0, slowest
        for sock in sockets:
            status, message = json_error(read_all(sock))
            assert status == 408, message
    finally:
        for sock in sockets:
            sock.close()
    assert_untouched(served)


def test_beyond_the_connection_limit_clients_get_429_at_once(served: Served) -> None:
    sockets = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.settimeout(REQUEST_TIMEOUT_S + 10)
            sock.connect(served.sock)
            sock.sendall(b"GET /v")  # stalls: holds its thread
        asked = time.monotonic()
        status, message = json_error(exchange(served.sock, b"GET /vm HTTP/1.1\r\n\r\n"))
        assert status == 429 and f"{MAX_CONNECTIONS} clients are being served" in message, message
        assert time.monotonic() - asked < 2
    finally:
        for sock in sockets:
            sock.close()
    # The stalled clients are gone: their threads end and the server serves again.
    deadline = time.monotonic() + 10
    while True:
        answer = exchange(served.sock, b"GET /vm HTTP/1.1\r\n\r\n")
        if answer.startswith(b"HTTP/1.0 200") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert answer.startswith(b"HTTP/1.0 200"), answer[:200]
    assert_untouched(served)
