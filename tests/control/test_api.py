"""The control API against a real running test guest: every endpoint, the socket's
permissions, and bad requests that must get a 4xx with a clear JSON error and
leave the guest running and verifying its memory."""

from __future__ import annotations

import io
import os
import socket
import stat
import time
from pathlib import Path

import pytest

import snapvisor
from control_helpers import assert_healthy, last_rounds, put, put_json, raw_request, wait_for_rounds
from snapvisor.control import ApiClient, ApiSocketError, ControlError, serve
from snapvisor.store import Repository

pytestmark = pytest.mark.kvm

CMDLINE = "console=ttyS0 tg.mem=8 tg.rate=10 tg.pages=256 tg.rounds=0"


@pytest.fixture
def running(testguest: Path, tmp_path: Path):
    """(VM, console, socket path, controller) of a guest served on a fresh socket."""
    out = io.BytesIO()
    vm = snapvisor.VM.boot(testguest, mem="64M", cmdline=CMDLINE, serial_out=out, name="api-test")
    sock = tmp_path / "api.sock"
    try:
        with serve(vm, api_sock=sock) as controller:
            wait_for_rounds(out, 1, 1)
            yield vm, out, str(sock), controller
    finally:
        vm.close()


def advances(out: io.BytesIO, seconds: float = 0.6) -> bool:
    before = last_rounds(out.getvalue()).get(0, -1)
    time.sleep(seconds)
    return last_rounds(out.getvalue()).get(0, -1) > before


def test_socket_is_owner_only_and_removed_at_the_end(testguest: Path, tmp_path: Path) -> None:
    vm = snapvisor.VM.boot(testguest, mem="64M", cmdline=CMDLINE, serial_out=io.BytesIO())
    sock = tmp_path / "api.sock"
    try:
        with serve(vm, api_sock=sock):
            assert stat.S_ISSOCK(sock.stat().st_mode)
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert not sock.exists()
    finally:
        vm.close()


def test_vm_info_pause_resume_and_shutdown(running) -> None:
    vm, out, sock, _ = running
    api = ApiClient(sock)
    info = api.vm()
    assert info["name"] == "api-test" and info["state"] == "Running"
    assert info["vcpus"] == 1 and info["memory_bytes"] == 64 << 20
    assert info["schedule"]["enabled"] is False and info["last_snapshot"] is None

    api.pause()
    assert api.vm()["state"] == "Paused"
    assert not advances(out)
    api.pause()  # idempotent
    api.resume()
    assert api.vm()["state"] == "Running"
    assert advances(out)

    api.shutdown()
    status = vm.wait(10)
    assert status is not None and status.reason == "stopped"
    assert api.vm()["state"] == "Stopped"
    with pytest.raises(ControlError) as refused:
        api.pause()
    assert refused.value.status == 409 and "has stopped" in str(refused.value)


def test_snapshot_through_the_api(running, tmp_path: Path) -> None:
    vm, out, sock, _ = running
    api = ApiClient(sock)
    repo_url = str(tmp_path / "repo")
    first = api.snapshot(repo_url, tags=["one"])
    second = api.snapshot(repo_url)
    third = api.snapshot(repo_url, full=True)
    assert (first["full"], second["full"], third["full"]) == (True, False, True)
    assert second["parent"] == first["id"] and second["pause_s"] < 1.0
    assert first["memory_bytes"] == 64 << 20 and first["disk_bytes"] == 0  # RAM, as GET /vm counts it
    with Repository.open_url(repo_url) as repo:
        listed = {s.id: s for s in repo.list_snapshots()}
    assert set(listed) == {first["id"], second["id"], third["id"]}
    assert listed[first["id"]].tags == ["one"] and listed[first["id"]].vm == "api-test"
    assert api.vm()["last_snapshot"]["id"] == third["id"]

    # A paused VM is the operator's: a snapshot would resume it, so it is refused.
    api.pause()
    with pytest.raises(ControlError) as refused:
        api.snapshot(repo_url)
    assert refused.value.status == 409 and "paused by the operator" in str(refused.value)
    api.resume()
    assert advances(out)


def test_schedule_through_the_api(running, tmp_path: Path) -> None:
    _, out, sock, _ = running
    api = ApiClient(sock)
    repo_url = str(tmp_path / "repo")
    status = api.set_schedule(every="1s", repos=[repo_url], keep={"last": 2}, tags=["sched"])
    assert status["enabled"] and status["every_s"] == 1.0 and status["keep"] == {"last": 2}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        target = api.schedule()["targets"][0]
        if target["snapshots"] >= 4:
            break
        time.sleep(0.2)
    assert target["snapshots"] >= 4 and target["last_error"] is None, target
    assert target["last_success"] and target["next_run"] > target["last_success"]
    assert target["last_prune"]["kept"] == 2
    api.set_schedule(every=None)
    assert api.schedule() == {"enabled": False, "targets": []}
    with Repository.open_url(repo_url) as repo:
        snapshots = repo.list_snapshots()
    # Retention after each snapshot: at most the two newest (one more may land
    # between the last prune and turning the schedule off).
    assert 2 <= len(snapshots) <= 3 and all(s.tags == ["sched"] for s in snapshots)
    assert target["last_snapshot"] in {s.id for s in snapshots}
    assert advances(out)
    assert_healthy(out.getvalue())


BAD_REQUESTS = [
    # (what, raw request, status, message fragment)
    ("unknown path", b"GET /nope HTTP/1.1\r\n\r\n", 404, "no endpoint /nope"),
    ("wrong method", b"DELETE /vm HTTP/1.1\r\n\r\n", 405, "use GET"),
    ("no length", b"PUT /vm/state HTTP/1.1\r\n\r\n", 411, "Content-Length"),
    ("chunked", b"PUT /vm/state HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, "not chunked"),
    ("bad length", b"PUT /vm/state HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400, "not a number"),
    ("too big", b"PUT /snapshot HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n", 413, "at most 65536"),
    ("short body", b"PUT /vm/state HTTP/1.1\r\nContent-Length: 50\r\n\r\n{}", 400, "ended after 2 of 50"),
    ("not json", b"PUT /vm/state HTTP/1.1\r\nContent-Length: 5\r\n\r\nPause", 400, "not valid JSON"),
    ("not utf-8", b"PUT /vm/state HTTP/1.1\r\nContent-Length: 2\r\n\r\n\xff\xfe", 400, "not valid JSON"),
    ("json array", b"PUT /vm/state HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]", 400, "must be a JSON object"),
]

BAD_BODIES = [
    ("/vm/state", {}, "missing field(s) ['state']"),
    ("/vm/state", {"state": "Frozen"}, "'Frozen' is not one of"),
    ("/vm/state", {"state": 1}, "state must be the string"),
    ("/vm/state", {"state": "Resumed", "force": "yes"}, "force must be true or false"),
    ("/vm/state", {"state": "Resumed", "hard": True}, "unknown field(s) ['hard']"),
    ("/snapshot", {}, "missing field(s) ['repo']"),
    ("/snapshot", {"repo": 5}, "repo must be a non-empty string"),
    ("/snapshot", {"repo": "relative/dir"}, "must be an absolute path"),
    ("/snapshot", {"repo": "ftp://x/y"}, "must be an absolute path"),
    ("/snapshot", {"repo": "/tmp/r", "full": "yes"}, "full must be true or false"),
    ("/snapshot", {"repo": "/tmp/r", "tags": "x"}, "tags must be a list"),
    ("/snapshot", {"repo": "/tmp/r", "tags": ["a b"]}, "tag name 'a b' is invalid"),
    ("/snapshot", {"repo": "/tmp/r", "tags": ["t"] * 17}, "at most 16"),
    ("/snapshot", {"repo": "/tmp/r", "compress": 9}, "unknown field(s) ['compress']"),
    ("/schedule", {"every": "soon", "repos": ["/tmp/r"]}, "'soon' is not a duration"),
    ("/schedule", {"every": 0.01, "repos": ["/tmp/r"]}, "every must be between"),
    ("/schedule", {"every": "1m", "repos": []}, "needs 1 to 8 repositories"),
    ("/schedule", {"every": "1m", "repos": ["/tmp/r", "/tmp/r"]}, "listed twice"),
    ("/schedule", {"every": "1m", "repos": ["/tmp/r"], "keep": {"last": "3"}}, "keep.last must be a whole number"),
    ("/schedule", {"every": "1m", "repos": ["/tmp/r"], "keep": {"lots": 3}}, "unknown keep rule(s) ['lots']"),
    ("/schedule", {"every": "1m", "repos": ["/tmp/r"], "keep": {}}, "keep would remove every snapshot"),
    ("/schedule", {"every": "1m", "repo": "/tmp/r"}, "unknown field(s) ['repo']"),
    ("/actions", {"action": "reboot"}, "the only action is 'shutdown'"),
    ("/actions", {"action": ["shutdown"]}, "is unknown"),
    ("/migrate", {}, "missing field(s) ['to']"),
    ("/migrate", {"to": 7000}, "to must be the receiver's HOST:PORT"),
    ("/migrate", {"to": "192.0.2.20"}, "port 1 to 65535, not '192.0.2.20'"),
    ("/migrate", {"to": "192.0.2.20:0"}, "port 1 to 65535"),
    ("/migrate", {"to": "192.0.2.20:65536"}, "port 1 to 65535"),
    ("/migrate", {"to": ":7000"}, "to must be the receiver's HOST:PORT"),
    ("/migrate", {"to": "host name:7000"}, "to must be the receiver's HOST:PORT"),
    ("/migrate", {"to": "192.0.2.20:7000", "downtime_ms": "50"}, "downtime_ms must be a number"),
    ("/migrate", {"to": "192.0.2.20:7000", "downtime_ms": 0}, "downtime_ms must be a number"),
    ("/migrate", {"to": "192.0.2.20:7000", "downtime_ms": True}, "downtime_ms must be a number"),
    ("/migrate", {"to": "192.0.2.20:7000", "downtime_ms": 1e9}, "at most 60000"),
    ("/migrate", {"to": "192.0.2.20:7000", "max_time": "soon"}, "max_time: 'soon' is not a duration"),
    ("/migrate", {"to": "192.0.2.20:7000", "max_time": -1}, "max_time must be above 0 s"),
    ("/migrate", {"to": "192.0.2.20:7000", "max_time": "2d"}, "at most a day"),
    ("/migrate", {"to": "192.0.2.20:7000", "max_time": [60]}, "max_time must be a duration string"),
    ("/migrate", {"to": "192.0.2.20:7000", "timeout": "soon"}, "timeout: 'soon' is not a duration"),
    ("/migrate", {"to": "192.0.2.20:7000", "timeout": 0}, "timeout must be above 0 s"),
    ("/migrate", {"to": "192.0.2.20:7000", "timeout": "2h"}, "at most an hour"),
    ("/migrate", {"to": "192.0.2.20:7000", "timeout": False}, "timeout must be a duration string"),
    ("/migrate", {"to": "192.0.2.20:7000", "auto_converge": "yes"}, "auto_converge must be true or false"),
    ("/migrate", {"to": "192.0.2.20:7000", "repo": "relative/dir"}, "must be an absolute path"),
    ("/migrate", {"to": "192.0.2.20:7000", "speed": 1}, "unknown field(s) ['speed']"),
]


def test_bad_requests_get_a_clear_4xx_and_leave_the_vm_alone(running, tmp_path: Path) -> None:
    vm, out, sock, _ = running
    for what, request, status, message in BAD_REQUESTS:
        answer_status, answer = raw_request(sock, request)
        assert answer_status == status, (what, answer)
        assert message in answer["error"], (what, answer)
    for endpoint, body, message in BAD_BODIES:
        answer_status, answer = put_json(sock, endpoint, body)
        assert answer_status == 400, (endpoint, body, answer)
        assert message in answer["error"], (endpoint, body, answer)
    # A client that connects and sends nothing, or half a request, costs one
    # thread until its read timeout, nothing else.
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(sock)
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half.connect(sock)
    half.sendall(b"PUT /vm/state HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"st")
    try:
        info = ApiClient(sock, timeout=5).vm()
        assert info["state"] == "Running" and info["schedule"]["enabled"] is False
        assert not (tmp_path / "r").exists()
        assert vm.vm.running and advances(out)
        wait_for_rounds(out, 1, max(last_rounds(out.getvalue()).values()) + 2)
        assert_healthy(out.getvalue())
    finally:
        idle.close()
        half.close()


def test_a_failing_snapshot_is_a_502_and_the_vm_runs_on(running, tmp_path: Path) -> None:
    _, out, sock, _ = running
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    status, answer = put_json(sock, "/snapshot", {"repo": str(blocked / "repo")})
    assert status == 502 and str(blocked) in answer["error"], answer
    assert advances(out)
    status, answer = put(sock, "/vm/state", b'{"state": "Paused"}')
    assert status == 204 and answer is None
    status, _ = put(sock, "/vm/state", b'{"state": "Resumed"}')
    assert status == 204 and advances(out)


def test_socket_path_problems_are_clear(testguest: Path, tmp_path: Path) -> None:
    vm = snapvisor.VM.boot(testguest, mem="64M", cmdline=CMDLINE, serial_out=io.BytesIO())
    try:
        regular = tmp_path / "plain-file"
        regular.write_text("")
        with pytest.raises(ApiSocketError, match="exists and is not a socket"):
            with serve(vm, api_sock=regular):
                pass
        with pytest.raises(ApiSocketError, match="check that its directory exists"):
            with serve(vm, api_sock=tmp_path / "missing-dir" / "api.sock"):
                pass
        # A socket left by a VMM that died is replaced; a live one is not.
        stale = tmp_path / "stale.sock"
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(stale))
        dead.close()
        with serve(vm, api_sock=stale):
            assert ApiClient(stale).vm()["state"] == "Running"
            with pytest.raises(ApiSocketError, match="another process is serving"):
                with serve(vm, api_sock=stale):
                    pass
            assert ApiClient(stale).vm()["state"] == "Running"
        assert vm.vm.running and not os.path.exists(stale)
    finally:
        vm.close()
