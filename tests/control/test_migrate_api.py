"""PUT /migrate against a real running test guest, where the migration cannot
succeed (tests/migrate moves VMs between two hosts): refused in the wrong state,
a failure is a 502 saying the VM keeps running here, and while one runs the VM
shows as Migrating and everything else that would pause it is refused."""

from __future__ import annotations

import socket
import threading

import pytest

from control_helpers import assert_healthy, put_json
from snapvisor.control import ApiClient, ControlError
from test_api import advances, running  # noqa: F401 - the fixture

pytestmark = pytest.mark.kvm


def closed_port() -> int:
    """A local port where nothing listens (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_migrate_is_refused_while_paused_and_once_stopped(running) -> None:
    vm, out, sock, _ = running
    api = ApiClient(sock)
    api.pause()
    status, answer = put_json(sock, "/migrate", {"to": f"127.0.0.1:{closed_port()}"})
    assert status == 409 and "paused by the operator" in answer["error"], answer
    assert api.vm()["state"] == "Paused" and not advances(out)
    api.resume()
    assert advances(out)

    api.shutdown()
    assert vm.wait(10) is not None
    status, answer = put_json(sock, "/migrate", {"to": f"127.0.0.1:{closed_port()}"})
    assert status == 409 and "has stopped" in answer["error"], answer


def test_a_failed_migration_is_a_502_and_the_vm_runs_on(running) -> None:
    _, out, sock, _ = running
    to = f"127.0.0.1:{closed_port()}"
    status, answer = put_json(sock, "/migrate", {"to": to, "downtime_ms": 20, "max_time": "30s"})
    assert status == 502, answer
    assert f"migration to {to} failed, the VM keeps running on this host: cannot connect" in answer["error"]
    assert ApiClient(sock).vm()["state"] == "Running"
    assert advances(out)
    assert_healthy(out.getvalue())


def test_while_migrating_the_vm_is_migrating_and_other_requests_are_refused(running, tmp_path) -> None:
    _, out, sock, _ = running
    api = ApiClient(sock)
    # A peer that accepts the connection and never speaks: the migration waits in
    # its hello until the peer hangs up.
    peer = socket.create_server(("127.0.0.1", 0))
    to = f"127.0.0.1:{peer.getsockname()[1]}"
    outcome: list[BaseException] = []

    def ask() -> None:
        try:
            api.migrate(to)
        except BaseException as exc:  # noqa: BLE001 - examined below
            outcome.append(exc)

    asking = threading.Thread(target=ask)
    asking.start()
    try:
        peer.settimeout(30)
        connection, _ = peer.accept()
        assert api.vm()["state"] == "Migrating"
        for endpoint, body, message in [
            ("/migrate", {"to": to}, f"already migrating to {to}"),
            ("/snapshot", {"repo": str(tmp_path / "repo")}, f"is migrating to {to}"),
            ("/vm/state", {"state": "Paused"}, f"is migrating to {to}"),
            ("/actions", {"action": "shutdown"}, f"is migrating to {to}"),
        ]:
            status, answer = put_json(sock, endpoint, body)
            assert status == 409 and message in answer["error"], (endpoint, answer)
        connection.close()
        asking.join(30)
    finally:
        peer.close()
    assert not asking.is_alive()
    [error] = outcome
    assert isinstance(error, ControlError) and error.status == 502, error
    assert "the VM keeps running on this host" in str(error) and "closed the connection" in str(error), error
    assert api.vm()["state"] == "Running" and not (tmp_path / "repo").exists()
    assert advances(out)
    assert_healthy(out.getvalue())


@pytest.mark.parametrize("body, error", [
    ({"tls_key": "-----BEGIN PRIVATE KEY-----"}, "unknown field(s) ['tls_key']"),
    ({"tls_cert": "/etc/snapvisor/host.pem"}, "unknown field(s) ['tls_cert']"),
    ({"tls_server_name": "host b"}, "tls_server_name must be the host name or IP address"),
    ({"tls_server_name": 7}, "tls_server_name must be the host name or IP address"),
])
def test_tls_material_never_comes_with_a_request(running, body: dict, error: str) -> None:
    """Certificates and keys are the VM process's own flags: a request naming
    them, or a malformed server name, is a 400 and the VM runs on."""
    _, out, sock, _ = running
    status, answer = put_json(sock, "/migrate", {"to": "192.0.2.20:7000", **body})
    assert status == 400 and error in answer["error"], answer
    assert ApiClient(sock).vm()["state"] == "Running" and advances(out)


def test_a_vm_without_tls_refuses_to_migrate_to_a_network_address(running) -> None:
    """Plaintext only on loopback: the VM's process has no --tls-* (nor --insecure)."""
    _, out, sock, _ = running
    status, answer = put_json(sock, "/migrate", {"to": "192.0.2.20:7000", "tls_server_name": "host-b.example"})
    assert status == 502, answer
    assert ("migration to 192.0.2.20:7000 failed, the VM keeps running on this host: migrating to "
            "192.0.2.20:7000 without TLS is refused") in answer["error"], answer
    assert "--tls-cert, --tls-key and --tls-ca" in answer["error"] and "--insecure" in answer["error"]
    assert ApiClient(sock).vm()["state"] == "Running" and advances(out)
