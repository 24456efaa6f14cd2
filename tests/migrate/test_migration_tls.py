"""Migration between hosts over mutual TLS 1.3: a VM moves with its guest going on
exactly, and nothing of its memory crosses the wire in clear. A peer without the
right certificate, or without TLS, is refused before any migration state is read:
the VM runs on at the source, nothing starts at the target, and both sides say
who was refused and why. Plaintext to a non-loopback address needs --insecure."""

from __future__ import annotations

import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cut_proxy import BACK, OUT, CutProxy
from migrate_lab import SWITCH_ADDRESS, Host, Process, wait_for_verified_rounds
from test_live_migration import PORT, QUIET, assert_continues, report, start_receiver, start_served
from test_migrate_running_vm import ask_to_migrate, assert_runs_on_a, last_round
from tls_certs import Ca, HostCert

pytestmark = pytest.mark.kvm

A_ADDRESS, B_ADDRESS = "192.0.2.10", "192.0.2.20"
PROXY_PORT = 7400
MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Pki:
    """A CA both hosts trust and the certificates of the cases below."""

    a: HostCert  # host A, signed by the CA
    b: HostCert  # host B (192.0.2.20), signed by the CA
    a_other_ca: HostCert  # host A, signed by another CA
    a_expired: HostCert  # host A, expired
    b_wrong_name: HostCert  # for 192.0.2.99, not B's address
    ca: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = Ca(directory, "dr"), Ca(directory, "other")
    return Pki(a=ca.issue("a", A_ADDRESS), b=ca.issue("b", B_ADDRESS),
               a_other_ca=other.issue("a-other", A_ADDRESS, trusts=ca),
               a_expired=ca.issue("a-expired", A_ADDRESS, expired=True),
               b_wrong_name=ca.issue("b-wrong", "192.0.2.99"), ca=ca.path)


# --- the test guest's memory (guests/testguest/README.md, user/pattern.h) ---------

def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def page_start(page: int, seq: int, seed: int = 1) -> bytes:
    """The first 16 bytes the test guest writes into working-set page `page` at sequence `seq`."""
    key = _mix(seed ^ _mix((page << 32 | seq) & MASK))
    return struct.pack("<QQ", *(_mix((key + word * 0x9E3779B97F4A7C15) & MASK) for word in (0, 1)))


def pages_in(data: bytes | bytearray, pages: int = 64, seqs: int = 4) -> int:
    """How many of the first `pages` guest pages, at any of the first `seqs`
    sequence numbers, appear in `data`."""
    return sum(1 for page in range(pages) if any(page_start(page, seq) in data for seq in range(1, seqs + 1)))


@pytest.mark.parametrize("security", ["tls", "insecure"])
def test_a_vm_moves_over_tls_and_its_memory_never_crosses_in_clear(
        testguest: Path, hosts: tuple[Host, Host], pki: Pki, security: str) -> None:
    """The same move, over TLS and (as the control that the wiretap sees pages at
    all) in plaintext with --insecure, through a recording proxy in the switch.
    The sender dials the proxy, so over TLS it names B's certificate with
    --tls-server-name. Over TLS, a peer without a certificate tries first: B
    refuses it and still takes the real migration."""
    a, b = hosts
    tls = security == "tls"
    receiver = start_receiver(b, security=tuple(pki.b.flags()) if tls else ("--insecure",))
    vm, sock = start_served(a, testguest, security=tuple(pki.a.flags()) if tls else ("--insecure",))
    if tls:
        # A peer without a certificate first: refused, and the receiver waits on for the real sender.
        assert _raw_tls_client(a, pki).wait(60) != 0
        receiver.wait_for_stderr("no client certificate", 30)
    with CutProxy(a.lab.ns, (SWITCH_ADDRESS, PROXY_PORT), (B_ADDRESS, PORT), None, record=True) as tap:
        mover = ask_to_migrate(a, sock, f"{SWITCH_ADDRESS}:{PROXY_PORT}", "migrate", "--json",
                               *(["--tls-server-name", B_ADDRESS] if tls else []))
        assert mover.wait(120) == 0, mover.stderr() + receiver.stderr()
    assert vm.wait(30) == 0, vm.stderr()
    console_b = wait_for_verified_rounds(receiver, 3, 60, after=last_round(vm))
    assert_continues(vm.stdout(), console_b[:console_b.rfind(b"\n") + 1])  # whole lines: B's guest writes on
    assert report(receiver)["vm"] == "mover"

    wire = tap.captured[OUT]
    assert len(wire) > 8 << 20, "the guest's memory went through the proxy"
    if tls:
        assert wire[:1] == b"\x16", "the first bytes on the wire are a TLS handshake record"
        assert pages_in(wire) == 0 and b"snapvisor-migr8" not in wire and b"mover" not in tap.captured[OUT]
        assert b"snapvisor-migr8" not in tap.captured[BACK]
    else:
        assert pages_in(wire) > 0 and wire.startswith(b"snapvisor-migr8")


@dataclass(frozen=True)
class Refusal:
    """One way a migration is refused. Flags are lists of Pki attribute names
    (their --tls-* flags) or literal flags."""

    name: str
    a_flags: tuple[str, ...]  # `run` on A (None in `client`: no snapvisor sender)
    b_flags: tuple[str, ...]  # `receive` on B
    sender_says: str  # in `migrate`'s error (or the raw client's output)
    receiver_says: str  # on B's stderr ("" when B never hears of it)
    b_keeps_listening: bool = True
    raw_client: bool = False  # a TLS client that has no certificate, instead of a snapvisor sender


REFUSALS = [
    Refusal("client-cert-from-another-ca", ("a_other_ca",), ("b",),
            "the receiver refused this host's certificate (tlsv1 alert unknown ca)",
            f"refused the migration from {A_ADDRESS}:", ),
    Refusal("no-client-cert", (), ("b",), "CERTIFICATE_REQUIRED",
            "no client certificate: the sender must run with --tls-cert, --tls-key and --tls-ca", raw_client=True),
    Refusal("expired-client-cert", ("a_expired",), ("b",), "certificate expired",
            "its certificate has expired or is not valid yet"),
    Refusal("server-cert-for-another-name", ("a",), ("b_wrong_name",),
            "its certificate is for another name", "the sender refused this host's certificate"),
    Refusal("plaintext-sender-to-tls-receiver", ("--insecure",), ("b",),
            "it may demand TLS", "the sender does not speak TLS"),
    Refusal("tls-sender-to-plaintext-receiver", ("a",), ("--insecure",),
            "the receiver does not speak TLS", "speaks TLS and this side runs without it", b_keeps_listening=False),
    Refusal("non-loopback-sender-without-tls", (), ("b",),
            f"migrating to {B_ADDRESS}:{PORT} without TLS is refused", ""),
]


def _flags(pki: Pki, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(flag for name in names
                 for flag in (getattr(pki, name).flags() if hasattr(pki, name) else [name]))


def _raw_tls_client(a: Host, pki: Pki) -> Process:
    """A TLS client that trusts the CA but has no certificate of its own, then
    speaks the stream's hello: the receiver must refuse it at the handshake."""
    script = ("import socket, ssl, sys\n"
              "context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n"
              "context.load_verify_locations(sys.argv[1])\n"
              "sock = context.wrap_socket(socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10),"
              " server_hostname=sys.argv[2])\n"
              "sock.sendall(b'snapvisor-migr8\\0\\1\\0\\0\\0')\n"
              "print(sock.recv(64))\n")
    return a.spawn("raw-client", [sys.executable, "-c", script, str(pki.ca), B_ADDRESS, str(PORT)])


class TestRefusedPeers:
    @pytest.mark.parametrize("case", REFUSALS, ids=lambda case: case.name)
    def test_refused_before_any_state_with_the_vm_running_on_at_the_source(
            self, testguest: Path, hosts: tuple[Host, Host], pki: Pki, case: Refusal) -> None:
        a, b = hosts
        receiver = start_receiver(b, security=_flags(pki, case.b_flags))
        if case.raw_client:
            client = _raw_tls_client(a, pki)
            assert client.wait(60) != 0
            assert case.sender_says in client.stderr(), client.stderr()
        else:
            vm, sock = start_served(a, testguest, cmdline=QUIET, security=_flags(pki, case.a_flags))
            mover = ask_to_migrate(a, sock, f"{B_ADDRESS}:{PORT}")
            assert mover.wait(60) == 1, mover.stderr()
            error = mover.stderr()
            assert "the VM keeps running on this host" in error and case.sender_says in error, error
            assert_runs_on_a(vm, sock)

        if not case.b_keeps_listening:
            receiver.wait(30)
        if case.receiver_says:
            receiver.wait_for_stderr(case.receiver_says, 30)
        if case.b_keeps_listening:
            # Refused at the handshake: nothing of the migration was read (the
            # "migration from ... started" line comes after it), and B waits for a proper peer.
            assert "still waiting" in receiver.stderr() or not case.receiver_says, receiver.stderr()
            assert not re.search(r"migration from \S+ started", receiver.stderr()), receiver.stderr()
            assert receiver.popen.poll() is None, receiver.stderr()
        else:
            assert receiver.popen.poll() not in (None, 0), receiver.stderr()
        assert receiver.stdout() == b"", "no guest may run on B"
        assert not any((b.workdir / "receiver-disks").iterdir()), "B keeps nothing of a refused migration"


def test_a_receiver_without_tls_on_a_network_address_refuses_to_start(hosts: tuple[Host, Host]) -> None:
    _, b = hosts
    receiver = b.run("receiver", ["receive", "--listen", f"{B_ADDRESS}:{PORT}"])
    assert receiver.wait(60) == 1, receiver.stderr()
    error = receiver.stderr()
    assert f"listening on {B_ADDRESS}:{PORT} without TLS is refused" in error, error
    assert "--tls-cert, --tls-key and --tls-ca" in error and "--insecure" in error, error
    assert receiver.stdout() == b""
