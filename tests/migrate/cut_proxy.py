"""A fault-injecting TCP proxy for migration tests: it forwards one connection
between a migration's sender and receiver and, at one point of the protocol,
resets the connection (RST both ways, as a NAT or firewall does) or silently
stalls it (nothing moves any more either way, the sockets stay open).

The point is a byte count in one direction: the proxy reads the stream's framing
(stream.HELLO, stream.HEADER) as it passes, and once it sees the chosen message it
knows its offset N. It then forwards exactly N bytes of that direction and cuts:

    before   N = the message's first byte: the peer wrote it (at least its header
             reached the proxy), none of it arrives
    inside   N = the middle of the message (of its header, when it has no payload)
    after    N = its last byte: all of it arrives, then the cut

The proxy runs in a thread that enters a network namespace (the lab's switch),
where both hosts are reachable.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import socket
import struct
import threading
from dataclasses import dataclass, field

from snapvisor.migrate.stream import HEADER, HELLO, Msg

CLONE_NEWNET = 0x40000000
OUT, BACK = "sender->receiver", "receiver->sender"
CHUNK = 1 << 16


@dataclass(frozen=True)
class Cut:
    direction: str  # OUT or BACK
    message: str  # "hello" or a Msg name; its first occurrence in `direction`
    where: str  # "before", "inside" or "after"
    mode: str  # "reset" or "stall"

    def __str__(self) -> str:
        return f"{self.mode}-{self.where}-{self.message}-{'out' if self.direction == OUT else 'back'}"


class _Framing:
    """Finds the messages of one direction in its byte stream, fed as it arrives."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, int, int]] = [("hello", 0, HELLO.size)]  # (name, start, end)
        # Where the first message whose header is not whole yet begins: bytes below
        # it belong to known messages.
        self.next_start = HELLO.size
        self.fed = 0
        self._header = b""  # what arrived of the header at next_start

    def feed(self, data: bytes) -> None:
        at = self.fed  # the stream offset of data[0]
        self.fed += len(data)
        while True:
            begin = self.next_start + len(self._header)
            if begin >= self.fed:
                return
            self._header += data[begin - at:begin - at + HEADER.size - len(self._header)]
            if len(self._header) < HEADER.size:
                return
            kind, length, _ = HEADER.unpack(self._header)
            name = Msg(kind).name if kind in Msg.__members__.values() else f"type{kind}"
            end = self.next_start + HEADER.size + length
            self.messages.append((name, self.next_start, end))
            self.next_start, self._header = end, b""

    def names(self) -> list[str]:
        return [name for name, _, _ in self.messages if name != "hello" or self.fed]


@dataclass
class CutProxy:
    """Listen on `listen` inside namespace `netns`, forward the one connection to
    `upstream`, and apply `cut` (None: only forward). `fired` is set when the cut happened; `seen` lists,
    per direction, the messages that passed (their names, in order)."""

    netns: str
    listen: tuple[str, int]
    upstream: tuple[str, int]
    cut: Cut | None
    fired: threading.Event = field(default_factory=threading.Event)
    seen: dict[str, list[str]] = field(default_factory=lambda: {OUT: [], BACK: []})
    # Every byte that passed, per direction, when `record` (what a wiretap sees).
    record: bool = False
    captured: dict[str, bytearray] = field(default_factory=lambda: {OUT: bytearray(), BACK: bytearray()})
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._main, name="cut-proxy", daemon=True)

    def __enter__(self) -> "CutProxy":
        self._thread.start()
        if not self._ready.wait(30) or self.error is not None:
            raise RuntimeError(f"the proxy did not start: {self.error}")
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)
        for sock in self._sockets:
            sock.close()

    # --- the proxy's thread ---------------------------------------------------------------
    def _main(self) -> None:
        try:
            _enter_netns(self.netns)
            listener = socket.create_server(self.listen)
            self._sockets.append(listener)
            listener.settimeout(0.1)
            self._ready.set()
            while not self._stop.is_set():
                try:
                    downstream, _ = listener.accept()
                    break
                except socket.timeout:
                    continue
            else:
                return
            self._sockets.append(downstream)
            upstream = socket.create_connection(self.upstream, timeout=10)
            self._sockets.append(upstream)
            try:
                self._forward(downstream, upstream)
            except (ConnectionError, TimeoutError):
                # One side reset the connection (or gave up on it) before the cut:
                # pass the reset on, as a router would.
                _reset(downstream, upstream)
        except BaseException as exc:  # noqa: BLE001 - reported to the test through .error
            self.error = exc
            self._ready.set()

    def _forward(self, sender: socket.socket, receiver: socket.socket) -> None:
        peers = {OUT: (sender, receiver), BACK: (receiver, sender)}
        framing = {OUT: _Framing(), BACK: _Framing()}
        forwarded = {OUT: 0, BACK: 0}
        held = {OUT: b"", BACK: b""}  # read, not forwarded yet (only the cut's direction holds bytes back)
        open_ends = {OUT, BACK}
        selector = selectors.DefaultSelector()
        for direction, (source, _) in peers.items():
            source.setblocking(True)
            selector.register(source, selectors.EVENT_READ, direction)
        while open_ends and not self._stop.is_set():
            for key, _ in selector.select(0.1):
                direction = key.data
                source, destination = peers[direction]
                data = source.recv(CHUNK)
                if not data:
                    selector.unregister(source)
                    open_ends.discard(direction)
                    _shutdown_write(destination)
                    continue
                if self.record:
                    self.captured[direction] += data
                frames = framing[direction]
                frames.feed(data)
                self.seen[direction] = frames.names()
                pending = held[direction] + data
                limit = forwarded[direction] + len(pending)
                cut_at = self._cut_offset(direction, frames)
                if self.cut is not None and self.cut.direction == direction:
                    # Hold back a header not yet whole: it may be the message to cut before.
                    limit = min(limit, frames.next_start)
                    if cut_at is not None:
                        limit = min(limit, cut_at)
                count = limit - forwarded[direction]
                if count:
                    destination.sendall(pending[:count])
                    forwarded[direction] += count
                held[direction] = pending[count:]
                if cut_at is not None and forwarded[direction] == cut_at and (
                        held[direction] or self.cut.where == "after"):
                    self._fire(sender, receiver)
                    return

    def _cut_offset(self, direction: str, frames: _Framing) -> int | None:
        cut = self.cut
        if cut is None or cut.direction != direction:
            return None
        for name, start, end in frames.messages:
            if name == cut.message:
                return {"before": start, "inside": start + (end - start) // 2, "after": end}[cut.where]
        return None

    def _fire(self, sender: socket.socket, receiver: socket.socket) -> None:
        self.fired.set()
        if self.cut.mode == "reset":
            _reset(sender, receiver)
            return
        # A stall: nothing is read or written any more; the sockets stay open until
        # the test ends (__exit__), as a link that silently drops everything.
        self._stop.wait()


def _enter_netns(name: str) -> None:
    """Move the calling thread into network namespace `name` (`ip netns` names)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {name}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def _reset(*sockets: socket.socket) -> None:
    for sock in sockets:
        # Linger 0: close() sends an RST instead of a FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
