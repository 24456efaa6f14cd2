"""Who may take part in a migration, and how the stream is protected.

A migration runs over mutual TLS 1.3 when the host has a certificate, its key and
the CA both hosts trust (`MigrationTls`): the receiver accepts only a sender whose
certificate chains to that CA, the sender only a receiver whose certificate does
and names the address it dialled. Without TLS the stream is plaintext, which is
allowed only on a loopback address, or when the operator says so (`insecure`):
whoever reaches the port could otherwise push a VM into the host or read one off
the wire. The handshake completes, within the connection's timeout, before a
single byte of the migration stream is read or written.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from snapvisor.migrate.errors import MigrationError

# OpenSSL verification codes (X509_V_ERR_*) that an operator fixes in distinct ways.
_UNKNOWN_CA = {2, 18, 19, 20, 21}
_EXPIRED = {9, 10}  # not yet valid, expired
_WRONG_NAME = {62, 64}  # host name mismatch, IP address mismatch
TLS_FLAGS = "--tls-cert, --tls-key and --tls-ca"


class TlsRefused(MigrationError):
    """The peer failed (or refused) the TLS handshake: nothing of the migration was exchanged."""


@dataclass(frozen=True)
class TlsFiles:
    """This host's certificate and key (PEM), and the CA certificate both hosts trust."""

    cert: Path
    key: Path
    ca: Path


class MigrationTls:
    """The TLS contexts of one host: as receiver (server) and as sender (client).
    The same host certificate serves both roles; each side demands the other's."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.server = self._context(ssl.PROTOCOL_TLS_SERVER)
        self.client = self._context(ssl.PROTOCOL_TLS_CLIENT)

    def _context(self, protocol: int) -> ssl.SSLContext:
        context = ssl.SSLContext(protocol)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_cert_chain(self.files.cert, self.files.key)
        except (OSError, ssl.SSLError) as exc:
            raise MigrationError(f"cannot use the TLS certificate {self.files.cert} with key {self.files.key}: "
                                 f"{_reason_text(exc)}; give a PEM certificate and its own private key "
                                 f"(docs/migration.md shows how to make them)") from None
        try:
            context.load_verify_locations(cafile=self.files.ca)
        except (OSError, ssl.SSLError) as exc:
            raise MigrationError(f"cannot use the TLS CA certificate {self.files.ca}: {_reason_text(exc)}; "
                                 f"give the PEM certificate of the CA that signed both hosts' certificates") from None
        return context


@dataclass(frozen=True)
class Protection:
    """How this host's migrations are protected: `tls`, or plaintext, which
    `insecure` allows on non-loopback addresses."""

    tls: MigrationTls | None = None
    insecure: bool = False

    def check_address(self, host: str, what: str) -> None:
        """Refuse plaintext on a non-loopback `host` unless insecure; `what` names
        the use ('listening on 192.0.2.2:7000')."""
        if self.tls is None and not self.insecure and not is_loopback(host):
            raise MigrationError(
                f"{what} without TLS is refused: anyone who reaches the port could inject or read the VM; "
                f"give {TLS_FLAGS} (docs/migration.md shows how to make them), or --insecure to send the VM "
                f"in clear on a network you trust")

    def accept(self, conn: socket.socket, peer: str, timeout: float) -> socket.socket:
        """The receiver's side of the handshake on an accepted connection."""
        if self.tls is None:
            return conn
        conn.settimeout(timeout)
        wrapped = self.tls.server.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        try:
            wrapped.do_handshake()
        except (OSError, ssl.SSLError) as exc:
            _close_quietly(wrapped)
            raise TlsRefused(f"refused the migration from {peer}: the TLS handshake failed: "
                             f"{describe_tls_error(exc, 'sender')}") from None
        return wrapped

    def connect(self, conn: socket.socket, address: str, host: str, server_name: str | None,
                timeout: float) -> socket.socket:
        """The sender's side of the handshake on a connected socket to `address`;
        the receiver's certificate must name `server_name`, by default the `host` dialled."""
        if self.tls is None:
            return conn
        conn.settimeout(timeout)
        wrapped = self.tls.client.wrap_socket(conn, server_hostname=server_name or host,
                                              do_handshake_on_connect=False)
        try:
            wrapped.do_handshake()
        except (OSError, ssl.SSLError) as exc:
            _close_quietly(wrapped)
            raise TlsRefused(f"the TLS handshake with {address} failed: "
                             f"{describe_tls_error(exc, 'receiver')}") from None
        return wrapped


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and 'localhost'; names are not resolved (a name that
    resolves to loopback today may not tomorrow)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def describe_tls_error(exc: BaseException, peer_role: str) -> str:
    """What went wrong in a TLS exchange, in the operator's terms; `peer_role` is
    'sender' or 'receiver' (the other side)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code in _UNKNOWN_CA:
            why = "its certificate is not signed by the CA of --tls-ca (unknown CA)"
        elif code in _EXPIRED:
            why = "its certificate has expired or is not valid yet"
        elif code in _WRONG_NAME:
            why = (f"its certificate is for another name ({exc.verify_message}); give the receiver a certificate "
                   f"for the address dialled, or --tls-server-name with the name its certificate has")
        else:
            why = f"its certificate is not valid: {exc.verify_message}"
        return f"the {peer_role}'s certificate was refused: {why}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return ("no client certificate: the sender must run with " + TLS_FLAGS if peer_role == "sender" else
                    "the receiver demands a client certificate: give this host " + TLS_FLAGS)
        if reason in ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "HTTP_REQUEST", "RECORD_LAYER_FAILURE",
                      "PACKET_LENGTH_TOO_LONG", "UNEXPECTED_RECORD"):
            return (f"the {peer_role} does not speak TLS (it runs without {TLS_FLAGS}?); "
                    f"both hosts need TLS, or both --insecure")
        if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
                      "TLSV1_ALERT_DECRYPT_ERROR", "SSLV3_ALERT_CERTIFICATE_UNKNOWN"):
            return (f"the {peer_role} refused this host's certificate ({_reason_text(exc)}); give this host a "
                    f"valid certificate signed by the CA the {peer_role} trusts")
        return _reason_text(exc)
    if isinstance(exc, socket.timeout):
        return f"the {peer_role} did not complete the handshake in time"
    if isinstance(exc, ConnectionError):
        return f"the {peer_role} closed the connection during the handshake (it may not speak TLS, or refused us)"
    return str(exc)


def _reason_text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return getattr(exc, "strerror", None) or str(exc)


def _close_quietly(sock: socket.socket) -> None:
    """Close after a failed handshake without a reset: the peer may still have
    unread bytes in flight, and a reset could destroy the alert that says why."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(1.0)
        while sock.recv(1 << 16):
            pass
    except (OSError, ValueError):
        pass
    sock.close()
