"""A client for the control API, for the CLI and for orchestration code:

    from snapvisor.control import ApiClient
    api = ApiClient("/run/web1.sock")
    api.vm()["state"]                                   # 'Running'
    api.snapshot("s3://backups/web1", tags=["pre-upgrade"])
    api.set_schedule(every="15m", repos=["s3://backups/web1"], keep={"last": 4, "daily": 7})
    api.migrate("192.0.2.20:7000")                      # the stats, once it runs there
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

from snapvisor.control.errors import ApiUnreachable, ControlError


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    """One request per call; `timeout` None waits as long as a snapshot takes."""

    def __init__(self, path: str | Path, timeout: float | None = None) -> None:
        self.path = str(path)
        self.timeout = timeout

    def request(self, method: str, endpoint: str, body: dict | None = None) -> dict | None:
        """The decoded answer; raises ControlError (with the server's status and
        message) for a 4xx/5xx, ApiUnreachable when nothing serves the socket."""
        connection = _UnixConnection(self.path, self.timeout)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            connection.request(method, endpoint, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ApiUnreachable(f"no VM answers on {self.path} ({exc.strerror}); start one with "
                                 f"`snapvisor run ... --api-sock {self.path}`") from None
        except PermissionError:
            raise ApiUnreachable(f"no permission to use {self.path}: the socket belongs to the user "
                                 f"who started the VM") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ApiUnreachable(f"the VM on {self.path} did not answer: {exc}") from None
        finally:
            connection.close()
        try:
            answer = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            raise ControlError(f"the VM on {self.path} sent something that is not JSON "
                               f"(HTTP {response.status})", response.status) from None
        if response.status >= 400:
            message = answer.get("error") if isinstance(answer, dict) else None
            raise ControlError(message or f"HTTP {response.status}", response.status)
        return answer

    def vm(self) -> dict:
        return self.request("GET", "/vm")

    def set_state(self, state: str, force: bool = False) -> None:
        self.request("PUT", "/vm/state", {"state": state, "force": force})

    def pause(self) -> None:
        self.set_state("Paused")

    def resume(self, force: bool = False) -> None:
        """`force` resumes a VM left paused by an unconfirmed migration handover:
        only once the target is known not to run it."""
        self.set_state("Resumed", force)

    def snapshot(self, repo: str, *, full: bool = False, tags: list[str] | tuple[str, ...] = ()) -> dict:
        return self.request("PUT", "/snapshot", {"repo": repo, "full": full, "tags": list(tags)})

    def schedule(self) -> dict:
        return self.request("GET", "/schedule")

    def set_schedule(self, *, every: str | float | None, repos: list[str] | None = None,
                     keep: dict | None = None, tags: list[str] | None = None) -> dict:
        if every is None:
            return self.request("PUT", "/schedule", {"every": None})
        body: dict = {"every": every, "repos": list(repos or [])}
        if keep is not None:
            body["keep"] = keep
        if tags:
            body["tags"] = list(tags)
        return self.request("PUT", "/schedule", body)

    def shutdown(self) -> None:
        self.request("PUT", "/actions", {"action": "shutdown"})

    def migrate(self, to: str, *, downtime_ms: float | None = None, max_time: str | float | None = None,
                auto_converge: bool = True, repo: str | None = None, timeout: str | float | None = None,
                tls_server_name: str | None = None) -> dict:
        """Move the VM to `snapvisor receive` at `to`; returns the migration's stats
        once it runs there. `timeout`: how long the connection may stall;
        `tls_server_name`: the name the receiver's certificate has, when not the host
        of `to` (the VM process's --tls-* flags say whether TLS is used). None
        leaves a setting at the server's default."""
        body: dict = {"to": to, "auto_converge": auto_converge}
        for key, value in (("downtime_ms", downtime_ms), ("max_time", max_time), ("repo", repo),
                           ("timeout", timeout), ("tls_server_name", tls_server_name)):
            if value is not None:
                body[key] = value
        return self.request("PUT", "/migrate", body)
