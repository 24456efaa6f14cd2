"""The migration stream: a versioned hello, then framed, checksummed messages.

    hello    MAGIC (16 bytes) | version u16 | reserved u16      (both sides, first)
    message  type u8 | 3 reserved | length u32 | crc32 u32 | payload[length]

The CRC covers the type, the length and the payload, so a flipped bit anywhere in a
message is refused instead of being written into guest memory. A peer with another
stream version is refused at the hello with a message naming both versions.
"""

from __future__ import annotations

import enum
import json
import socket
import ssl
import struct
import zlib
from typing import Any, Sequence

from snapvisor import __version__
from snapvisor.migrate.errors import MigrationError, StreamError
from snapvisor.migrate.tls import Protection, TlsRefused, describe_tls_error

MAGIC = b"snapvisor-migr8\0"
VERSION = 1
HELLO = struct.Struct("<16sHH")
HEADER = struct.Struct("<B3xII")
STATE_HEADER = struct.Struct("<dBI")  # STATE: sender's pause time (CLOCK_MONOTONIC), codec, raw length
MAX_MESSAGE = 256 << 20
# Without progress on a connection for this long, it is treated as cut.
DEFAULT_IO_TIMEOUT_S = 20.0
# First bytes of a TLS record (handshake, alert): a TLS peer met by a plaintext side.
TLS_RECORD_TYPES = (b"\x16", b"\x15")


class Msg(enum.IntEnum):
    OFFER = 1  # sender -> receiver, JSON: the VM's name, memory layout, optional base snapshot
    ACCEPT = 2  # receiver -> sender, JSON: whether the base snapshot is usable there
    PAGES = 3  # sender -> receiver, binary page batch (see pages.py)
    STATE = 4  # sender -> receiver: pause time + compressed VM state (the guest is paused)
    READY = 5  # receiver -> sender, JSON: the VM is built on the receiver, not started
    GO = 6  # sender -> receiver: start it; from here the sender never resumes its copy
    RESUMED = 7  # receiver -> sender, JSON: monotonic time the guest started there
    ERROR = 8  # either way, JSON {"message"}: the peer gives up, and says why
    SYNC = 9  # sender -> receiver at the end of a round, echoed back once all before it is applied


def parse_address(text: str) -> tuple[str, int]:
    """'192.0.2.2:7000' or '[2001:db8::2]:7000' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise MigrationError(f"'{text}' is not an address: give HOST:PORT, e.g. 192.0.2.2:7000 or [2001:db8::2]:7000")
    return host, int(port)


def _tune(sock: socket.socket, timeout: float) -> None:
    sock.settimeout(timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Unacknowledged data for this long aborts the connection: a cut link is noticed
    # even while the kernel's send buffer still has room.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(timeout * 1000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)


class Channel:
    """One migration connection: hello, then whole checked messages."""

    def __init__(self, sock: socket.socket, peer: str, timeout: float = DEFAULT_IO_TIMEOUT_S,
                 peer_role: str = "peer") -> None:
        _tune(sock, timeout)
        self.sock = sock
        self.peer = peer
        self.peer_role = peer_role  # 'sender' or 'receiver', for errors
        self.timeout = timeout
        self.bytes_sent = 0
        self._buffer = bytearray(1 << 16)

    @classmethod
    def connect(cls, address: str, timeout: float = DEFAULT_IO_TIMEOUT_S, protection: Protection = Protection(),
                server_name: str | None = None) -> "Channel":
        """A connection to the receiver at `address`, its TLS handshake (when
        `protection` has TLS) done; plaintext only where `protection` allows it."""
        host, port = parse_address(address)
        protection.check_address(host, f"migrating to {address}")
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise MigrationError(
                f"cannot connect to {address}: {exc.strerror or exc}; is `snapvisor receive --listen {address}` "
                f"running on the destination, and is it reachable?"
            ) from None
        return cls(protection.connect(sock, address, host, server_name, timeout), address, timeout, "receiver")

    def close(self) -> None:
        self.sock.close()

    # --- hello -------------------------------------------------------------------
    def hello(self) -> None:
        """Exchange magic and version; refuse any other version."""
        self._send_raw(HELLO.pack(MAGIC, VERSION, 0))
        magic, version, _ = HELLO.unpack(self._recv_exact(
            HELLO.size, "hello", "; it may demand TLS (--tls-cert, --tls-key and --tls-ca on both hosts)"))
        if magic[:1] in TLS_RECORD_TYPES and magic[1:2] == b"\x03":
            raise TlsRefused(
                f"{self.peer} speaks TLS and this side runs without it: give this host --tls-cert, --tls-key "
                f"and --tls-ca too (both hosts need TLS, or both --insecure)")
        if magic != MAGIC:
            raise StreamError(
                f"{self.peer} does not speak the snapvisor migration stream (it sent {magic[:16]!r}); "
                f"connect to a `snapvisor receive` listener"
            )
        if version != VERSION:
            raise StreamError(
                f"{self.peer} speaks migration stream version {version}, this snapvisor {__version__} speaks "
                f"version {VERSION}: run the same snapvisor release on both hosts"
            )

    # --- messages --------------------------------------------------------------------
    def send(self, kind: Msg, *parts: bytes | bytearray | memoryview) -> None:
        self.send_framed(frame_header(kind, parts), parts)

    def send_framed(self, header: bytes, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send a message whose header `frame_header` made (on any thread)."""
        self._send_raw(header, *parts)

    def send_json(self, kind: Msg, body: dict[str, Any]) -> None:
        self.send(kind, json.dumps(body, sort_keys=True).encode())

    def recv(self) -> tuple[Msg, memoryview]:
        """The next message; its payload is valid until the next recv (the
        receive buffer is reused: no fresh allocation per message)."""
        header = bytes(self._recv_exact(HEADER.size, "message header"))
        kind, length, crc = HEADER.unpack(header)
        if kind not in Msg.__members__.values() or length > MAX_MESSAGE:
            raise StreamError(
                f"the stream from {self.peer} is corrupt (message type {kind}, length {length}); "
                f"the migration was abandoned"
            )
        payload = self._recv_exact(length, f"{Msg(kind).name} message")
        if zlib.crc32(payload, zlib.crc32(header[:8])) != crc:
            raise StreamError(
                f"a {Msg(kind).name} message from {self.peer} fails its checksum: the stream is corrupt; "
                f"the migration was abandoned"
            )
        return Msg(kind), payload

    def expect(self, wanted: Msg) -> memoryview:
        """The payload of the next message, which must be `wanted`; an ERROR from the
        peer becomes a MigrationError with the peer's reason."""
        kind, payload = self.recv()
        if kind == Msg.ERROR:
            raise MigrationError(f"{self.peer} gave up: {decode_json(payload, kind).get('message', '?')}")
        if kind != wanted:
            raise StreamError(f"{self.peer} sent {kind.name} where {wanted.name} was due; the stream is out of order")
        return payload

    def send_error(self, message: str) -> None:
        """Best effort: tell the peer why this side gives up (the link may be gone)."""
        try:
            self.send_json(Msg.ERROR, {"message": message})
        except (MigrationError, OSError):
            pass

    # --- raw I/O ------------------------------------------------------------------------
    def _send_raw(self, *parts: bytes | bytearray | memoryview) -> None:
        try:
            for part in parts:
                self.sock.sendall(part)
                self.bytes_sent += memoryview(part).nbytes
        except ssl.SSLError as exc:
            raise self._tls_failed(exc) from None
        except socket.timeout:
            raise StreamError(
                f"sending to {self.peer} made no progress for {self.timeout:g} s: the connection is cut or the "
                f"receiver stopped reading"
            ) from None
        except (BrokenPipeError, ConnectionResetError):
            raise StreamError(f"{self.peer} closed the connection in the middle of the migration (it stopped, or "
                              f"something on the path reset the connection)") from None
        except OSError as exc:
            raise StreamError(f"the connection to {self.peer} broke while sending: {exc.strerror or exc}") from None

    def _recv_exact(self, length: int, what: str, closed_hint: str = "") -> memoryview:
        if len(self._buffer) < length:
            self._buffer = bytearray(length)
        view = memoryview(self._buffer)[:length]
        got = 0
        try:
            while got < length:
                n = self.sock.recv_into(view[got:])
                if n == 0:
                    raise StreamError(f"{self.peer} closed the connection in the middle of the migration "
                                      f"({what}){closed_hint}")
                got += n
        except ssl.SSLError as exc:
            raise self._tls_failed(exc) from None
        except socket.timeout:
            raise StreamError(
                f"nothing from {self.peer} for {self.timeout:g} s while waiting for the {what}: the connection is "
                f"cut or the peer hangs"
            ) from None
        except ConnectionResetError:
            raise StreamError(f"{self.peer} closed the connection in the middle of the migration ({what}; it "
                              f"stopped, or something on the path reset the connection)") from None
        except OSError as exc:
            raise StreamError(f"the connection to {self.peer} broke while receiving: {exc.strerror or exc}") from None
        return view

    def _tls_failed(self, exc: ssl.SSLError) -> TlsRefused:
        # TLS 1.3 finishes the client's handshake before the server checks the
        # client's certificate: its refusal arrives as an alert on the first read.
        return TlsRefused(f"the TLS connection with {self.peer} failed: {describe_tls_error(exc, self.peer_role)}")


def frame_header(kind: Msg, parts: Sequence[bytes | bytearray | memoryview]) -> bytes:
    """The header of a message made of `parts`, checksum included. Pure: workers
    frame page batches in parallel and the sending thread only writes them."""
    length = sum(memoryview(p).nbytes for p in parts)
    if length > MAX_MESSAGE:
        raise StreamError(f"a {kind.name} message of {length} bytes is over the {MAX_MESSAGE} byte limit")
    crc = zlib.crc32(HEADER.pack(kind, length, 0)[:8])
    for part in parts:
        crc = zlib.crc32(part, crc)
    return HEADER.pack(kind, length, crc)


def decode_json(payload: bytes | bytearray | memoryview, kind: Msg) -> dict[str, Any]:
    try:
        body = json.loads(bytes(payload))
    except (UnicodeDecodeError, json.JSONDecodeError):
        body = None
    if not isinstance(body, dict):
        raise StreamError(f"the {kind.name} message is not a JSON object; the stream is corrupt")
    return body
