"""The control API: HTTP/JSON on a Unix socket (Firecracker's convention).

    GET  /vm          name, state, vCPUs, memory, uptime, last snapshot, schedule
    PUT  /vm/state    {"state": "Paused" | "Resumed", "force": false}   (force: resume after an
                      unconfirmed migration handover, state HandoverUnconfirmed)
    PUT  /snapshot    {"repo": URL, "full": false, "tags": []}   -> the snapshot
    GET  /schedule    the schedule and, per repository, last success/error, next run
    PUT  /schedule    {"every": "15m", "repos": [URL], "keep": {"last": 3}, "tags": []}
                      or {"every": null} to turn it off
    PUT  /actions     {"action": "shutdown"}
    PUT  /migrate     {"to": "HOST:PORT", "downtime_ms": 50, "max_time": "2m", "auto_converge": true,
                       "repo": URL, "timeout": "20s",
                       "tls_server_name": NAME}   -> the migration's stats, once the VM runs there

Every answer, to whatever bytes arrive, is a status line and JSON (wire.py);
errors are {"error": "<what and how to fix it>"} with a 4xx status for a bad
request (the VM is untouched) and 502 when the VM tried and a dependency failed
(a store outage). The socket is created owner-only (0600) before it listens, and
the server runs on daemon threads, one per connection up to MAX_CONNECTIONS:
nothing a client sends can stop the VMM or starve GET /vm.
"""

from __future__ import annotations

import errno
import os
import socket
import socketserver
import stat
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from snapvisor.control.controller import VmController, validate_address, validate_server_name, validate_tags
from snapvisor.control.errors import (BadRequest, ControlError, MethodNotAllowed, NotFound, TooManyConnections,
                                      cut, shown)
from snapvisor.control.repo_url import validate_repo_url
from snapvisor.control.schedule import Schedule, Scheduler
from snapvisor.control.wire import ClientGone, Request, RequestReader, duration_from_json, linger, send_answer
from snapvisor.errors import SnapvisorError

MAX_BODY = 64 << 10
REQUEST_TIMEOUT_S = 10.0  # a request (line, headers, body) must arrive whole within it
# Clients served at once: each holds a thread until answered (a snapshot's length).
MAX_CONNECTIONS = 256
# Connections the kernel queues before accept(): a burst of clients must not be
# refused (a Unix socket refuses connect() with EAGAIN once the queue is full).
LISTEN_BACKLOG = 1024
# How long close() waits for a migration's answer to go out (see answer_before_close).
ANSWER_GRACE_S = 5.0
MAX_DOWNTIME_MS = 60_000.0
MAX_MIGRATION_TIME_S = 86_400.0
MAX_IO_TIMEOUT_S = 3_600.0


class ApiSocketError(SnapvisorError):
    """The API socket could not be created."""


def _fields(body: dict, allowed: set[str], required: set[str] = frozenset()) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise BadRequest(f"unknown field(s) {sorted(unknown)}; this request takes {sorted(allowed)}")
    missing = required - set(body)
    if missing:
        raise BadRequest(f"missing field(s) {sorted(missing)}")


class _Handler(socketserver.BaseRequestHandler):
    """One connection: one request, one answer (HTTP/1.0), then it closes."""

    server: "ApiServer"
    request: socket.socket

    # Routing: (method, path) -> handler method name.
    ROUTES = {
        ("GET", "/vm"): "get_vm",
        ("PUT", "/vm/state"): "put_state",
        ("PUT", "/snapshot"): "put_snapshot",
        ("GET", "/schedule"): "get_schedule",
        ("PUT", "/schedule"): "put_schedule",
        ("PUT", "/actions"): "put_action",
        ("PUT", "/migrate"): "put_migrate",
    }

    def handle(self) -> None:
        reader = RequestReader(self.request, self.server.request_timeout_s)
        try:
            request = reader.head()
        except ClientGone:
            return
        except ControlError as exc:
            send_answer(self.request, exc.status, {"error": str(exc)})
            return
        name = self.ROUTES.get((request.method, request.path))
        # A migration that succeeds ends the VM, and with it this process, just as
        # its answer is due: the server's close() waits for that answer.
        with self.server.answer_before_close() if name == "put_migrate" else nullcontext():
            try:
                status, answer = self._answer(request, reader, name)
            except ClientGone:
                return
            send_answer(self.request, status, answer)

    def finish(self) -> None:
        linger(self.request)

    def _answer(self, request: Request, reader: RequestReader, name: str | None) -> tuple[int, dict | None]:
        method, path = request.method, request.path
        try:
            if name is None:
                allowed = sorted(m for m, p in self.ROUTES if p == path)
                if allowed:
                    raise MethodNotAllowed(f"{cut(method)} {path} is not supported; use {' or '.join(allowed)}")
                raise NotFound(f"no endpoint {cut(path)}; the API has /vm, /vm/state, /snapshot, /schedule, "
                               f"/actions, /migrate")
            body = reader.json_body(request, MAX_BODY) if method == "PUT" else None
            return getattr(self, name)(body)
        except ClientGone:
            raise
        except ControlError as exc:
            return exc.status, {"error": str(exc)}
        except SnapvisorError as exc:
            return 400, {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - an API bug must not reach the VMM
            return 500, {"error": f"internal error: {type(exc).__name__}: {exc}"}

    # -- endpoints ---------------------------------------------------------------------

    @property
    def controller(self) -> VmController:
        return self.server.controller

    def get_vm(self, _body: None) -> tuple[int, dict]:
        return 200, self.controller.info()

    def put_state(self, body: dict) -> tuple[int, None]:
        _fields(body, {"state", "force"}, {"state"})
        if not isinstance(body["state"], str):
            raise BadRequest("state must be the string 'Paused' or 'Resumed'")
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise BadRequest("force must be true or false")
        self.controller.set_state(body["state"], force=force)
        return 204, None

    def put_snapshot(self, body: dict) -> tuple[int, dict]:
        _fields(body, {"repo", "full", "tags"}, {"repo"})
        url = validate_repo_url(body["repo"])
        full = body.get("full", False)
        if not isinstance(full, bool):
            raise BadRequest("full must be true or false")
        tags = validate_tags(body.get("tags", []))
        return 200, self.controller.snapshot(url, full=full, tags=tags).to_json()

    def _scheduler(self) -> Scheduler:
        scheduler = self.controller.scheduler
        if scheduler is None:
            raise NotFound("this VM has no scheduler")
        return scheduler

    def get_schedule(self, _body: None) -> tuple[int, dict]:
        return 200, self._scheduler().status()

    def put_schedule(self, body: dict) -> tuple[int, dict]:
        scheduler = self._scheduler()
        if "every" in body and body["every"] is None:
            _fields(body, {"every"})
            scheduler.set_schedule(None)
        else:
            schedule = Schedule.from_json(body)
            for url in schedule.repos:
                self.controller.check_repository(url)
            scheduler.set_schedule(schedule)
        return 200, scheduler.status()

    def put_action(self, body: dict) -> tuple[int, None]:
        _fields(body, {"action"}, {"action"})
        if body["action"] != "shutdown":
            raise BadRequest(f"action {shown(body['action'])} is unknown; the only action is 'shutdown'")
        self.controller.refuse_while_migrating()
        # Answer first: stopping the VM ends the process that serves this request.
        threading.Thread(target=self.controller.shutdown, name="api-shutdown", daemon=True).start()
        return 204, None

    def put_migrate(self, body: dict) -> tuple[int, dict]:
        # Imported here: processes that only use ApiClient (snapvisor.control) need none of it.
        from snapvisor.migrate.sender import DEFAULT_DOWNTIME_MS, DEFAULT_IO_TIMEOUT_S, DEFAULT_MAX_TIME_S

        # Certificates and keys are the VM process's own (its --tls-* flags): a request
        # can only say which name the receiver's certificate must have.
        _fields(body, {"to", "downtime_ms", "max_time", "auto_converge", "repo", "timeout", "tls_server_name"},
                {"to"})
        to = validate_address(body["to"])
        downtime_ms = body.get("downtime_ms", DEFAULT_DOWNTIME_MS)
        if not _is_number(downtime_ms) or not 0 < downtime_ms <= MAX_DOWNTIME_MS:
            raise BadRequest(f"downtime_ms must be a number of milliseconds above 0 and at most "
                             f"{MAX_DOWNTIME_MS:g}, not {shown(downtime_ms)}")
        max_time = duration_from_json("max_time", body.get("max_time", DEFAULT_MAX_TIME_S))
        if not 0 < max_time <= MAX_MIGRATION_TIME_S:
            raise BadRequest(f"max_time must be above 0 s and at most a day, not {shown(body['max_time'])}")
        timeout = duration_from_json("timeout", body.get("timeout", DEFAULT_IO_TIMEOUT_S))
        if not 0 < timeout <= MAX_IO_TIMEOUT_S:
            raise BadRequest(f"timeout must be above 0 s and at most an hour, not {shown(body['timeout'])}")
        auto_converge = body.get("auto_converge", True)
        if not isinstance(auto_converge, bool):
            raise BadRequest("auto_converge must be true or false")
        repo = validate_repo_url(body["repo"]) if "repo" in body else None
        server_name = validate_server_name(body["tls_server_name"]) if "tls_server_name" in body else None
        stats = self.controller.migrate(to, downtime_ms=float(downtime_ms), max_time_s=float(max_time),
                                        io_timeout_s=float(timeout), auto_converge=auto_converge, repo=repo,
                                        tls_server_name=server_name)
        return 200, stats.as_dict()


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves the control API for one VmController on `path` until `close()`."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG
    request_timeout_s = REQUEST_TIMEOUT_S

    def __init__(self, path: str | Path, controller: VmController) -> None:
        self.path = Path(path)
        self.controller = controller
        self._connections = 0
        self._connections_lock = threading.Lock()
        self._pending_answers = 0
        self._answered = threading.Condition()
        _clear_stale_socket(self.path)
        try:
            super().__init__(str(self.path), _Handler)
        except OSError as exc:
            raise ApiSocketError(f"cannot create the API socket {self.path}: {exc.strerror}; "
                                 f"check that its directory exists and is writable") from None
        self._thread = threading.Thread(target=self.serve_forever, name="api-server", daemon=True)

    def server_bind(self) -> None:
        super().server_bind()
        # Owner-only before listen(): nobody can connect before the mode is right.
        os.chmod(self.server_address, 0o600)

    def start(self) -> None:
        self._thread.start()

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:
        with self._connections_lock:
            self._connections += 1
            served = self._connections <= MAX_CONNECTIONS
        try:
            if served:
                super().process_request_thread(request, client_address)
            else:
                refused = TooManyConnections(f"{MAX_CONNECTIONS} clients are being served already; retry shortly")
                send_answer(request, refused.status, {"error": str(refused)})
                linger(request)
                self.shutdown_request(request)
        finally:
            with self._connections_lock:
                self._connections -= 1

    @contextmanager
    def answer_before_close(self) -> Iterator[None]:
        """close() waits (ANSWER_GRACE_S at most) for the answer sent in this block."""
        with self._answered:
            self._pending_answers += 1
        try:
            yield
        finally:
            with self._answered:
                self._pending_answers -= 1
                self._answered.notify_all()

    def close(self) -> None:
        with self._answered:
            self._answered.wait_for(lambda: not self._pending_answers, ANSWER_GRACE_S)
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket left by a VMM that died; refuse to touch anything else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ApiSocketError(f"{path} exists and is not a socket; choose another --api-sock path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ApiSocketError(f"cannot check the existing socket {path}: {exc.strerror}") from None
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise ApiSocketError(f"another process is serving {path}; stop it or choose another --api-sock path")
