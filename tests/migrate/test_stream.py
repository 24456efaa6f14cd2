"""The migration stream refuses what it cannot trust: another protocol, another
stream version, a message whose checksum fails, page numbers outside the guest.
A corrupted live migration is refused by the receiver and the guest runs on at
the sender, intact."""

from __future__ import annotations

import io
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import snapvisor
from migrate_lab import assert_healthy, rounds
from snapvisor.migrate import MigrationError, StreamError, listen, migrate, receive
from snapvisor.migrate.pages import PageBatch
from snapvisor.migrate.stream import HEADER, HELLO, MAGIC, Channel, Msg


def channel_pair() -> tuple[Channel, socket.socket]:
    """A Channel and the raw TCP socket at its other end."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    server.close()
    return Channel(client, "test-peer", timeout=5), peer


def test_other_stream_version_is_refused_with_both_versions_named() -> None:
    channel, peer = channel_pair()
    peer.sendall(HELLO.pack(MAGIC, 2, 0))
    with pytest.raises(StreamError, match="speaks migration stream version 2, .* speaks version 1"):
        channel.hello()


def test_other_protocol_is_refused() -> None:
    channel, peer = channel_pair()
    peer.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(StreamError, match="does not speak the snapvisor migration stream"):
        channel.hello()


def test_flipped_bit_fails_the_checksum() -> None:
    sender, peer = channel_pair()
    receiver = Channel(peer, "sender", timeout=5)
    sender.send(Msg.PAGES, b"\x01" * 1000)
    kind, payload = receiver.recv()
    assert (kind, bytes(payload)) == (Msg.PAGES, b"\x01" * 1000)
    # Capture the next message's bytes, flip one bit, and feed them to a fresh channel.
    raw_a, raw_b = channel_pair()
    raw_a.send(Msg.PAGES, b"\x01" * 1000)
    data = bytearray(raw_b.recv(4096))
    data[100] ^= 0x10
    victim, feed = channel_pair()
    feed.sendall(bytes(data))
    with pytest.raises(StreamError, match="fails its checksum"):
        victim.recv()


def test_page_numbers_outside_the_guest_are_refused() -> None:
    batch = PageBatch(np.array([], dtype=np.int64), b"", 0, 0, np.array([], dtype=np.int64),
                      np.array([], dtype=np.int64), np.array([5000], dtype=np.int64), np.array([], dtype=np.int64))
    payload = bytearray(b"".join(bytes(part) for part in batch.encode()))
    with pytest.raises(StreamError, match="beyond the guest's 4096 pages"):
        PageBatch.decode(payload, 4096, has_base=False)
    short = payload[:10]
    with pytest.raises(StreamError, match="shorter than its header"):
        PageBatch.decode(short, 4096, has_base=False)


class CorruptingProxy:
    """Forwards a TCP connection and flips one bit of the sender's stream once
    `after` bytes have passed."""

    def __init__(self, target: tuple[str, int], after: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.target = target
        self.after = after
        threading.Thread(target=self._serve, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, corrupt: bool) -> None:
        passed = 0
        try:
            while data := src.recv(1 << 16):
                if corrupt and passed <= self.after < passed + len(data):
                    data = bytearray(data)
                    data[self.after - passed] ^= 0x04
                passed += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        upstream = socket.create_connection(self.target)
        threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()


class StateCorruptingProxy(CorruptingProxy):
    """Forwards a migration and flips one bit in the payload of its STATE message:
    the corruption arrives while the guest is paused on the sender."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target, after=-1)

    def _pump(self, src: socket.socket, dst: socket.socket, corrupt: bool) -> None:
        if not corrupt:
            return super()._pump(src, dst, False)
        reader = src.makefile("rb")
        try:
            dst.sendall(reader.read(HELLO.size))
            while header := reader.read(HEADER.size):
                kind, length, _ = HEADER.unpack(header)
                payload = bytearray(reader.read(length))
                if kind == Msg.STATE:
                    payload[-1] ^= 0x01
                dst.sendall(header + payload)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def run_corrupted_migration(testguest: Path, make_proxy, refusal: str) -> None:
    """Migrate through a proxy that damages the stream: the receiver must refuse,
    run nothing, and the guest must go on at the sender, intact."""
    out_a, out_b = io.BytesIO(), io.BytesIO()
    vm = snapvisor.VM.boot(testguest, mem="64M", cmdline="console=ttyS0 tg.mem=16 tg.rate=20 tg.pages=512 tg.rounds=0",
                           serial_out=out_a, name="victim")
    listener = listen("127.0.0.1:0")
    proxy = make_proxy(listener.getsockname())
    refused: list[BaseException] = []

    def accept() -> None:
        try:
            receive(listener, serial_out=out_b, io_timeout_s=5)
        except BaseException as exc:
            refused.append(exc)

    receiver = threading.Thread(target=accept)
    receiver.start()
    try:
        while sum(1 for _, _, verified in rounds(out_a.getvalue()) if verified) < 2:
            time.sleep(0.05)
        with pytest.raises(MigrationError, match="the VM keeps running on this host"):
            migrate(vm, proxy.address, io_timeout_s=5)
        receiver.join(30)
        assert len(refused) == 1 and isinstance(refused[0], StreamError), refused
        assert re.search(refusal, str(refused[0])), refused[0]
        assert out_b.getvalue() == b"", "nothing may run on the receiver"
        last = max(number for _, number, _ in rounds(out_a.getvalue()))
        deadline = time.monotonic() + 30
        while max(number for _, number, _ in rounds(out_a.getvalue())) < last + 3:
            assert time.monotonic() < deadline, out_a.getvalue()[-500:]
            time.sleep(0.05)
        assert_healthy(out_a.getvalue())
        assert vm.vm.running and not vm.vm.paused
    finally:
        vm.close()
        listener.close()


@pytest.mark.kvm
def test_corrupted_pages_are_refused_and_the_guest_runs_on(testguest: Path) -> None:
    # One bit flipped inside the first round's pages.
    run_corrupted_migration(testguest, lambda target: CorruptingProxy(target, after=3 << 20),
                            r"PAGES message from .* fails its checksum|the stream from .* is corrupt")


@pytest.mark.kvm
def test_corrupted_state_is_refused_and_the_paused_guest_resumes(testguest: Path) -> None:
    # One bit flipped in the VM state, sent while the guest is paused for the handover.
    run_corrupted_migration(testguest, StateCorruptingProxy, r"a STATE message from .* fails its checksum")
