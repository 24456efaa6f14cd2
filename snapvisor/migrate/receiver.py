"""Live migration, receiving side.

Pages arrive into a staging memfd laid out like the guest's RAM. When the VM state
arrives (the guest is paused on the sender), the VM is built with its RAM mapped
copy-on-write from that memfd, so no page is copied during the downtime; the
receiver then reports READY, waits for GO, starts the guest and confirms RESUMED.
A stream that breaks or turns out corrupt before GO leaves nothing running here.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np

from snapvisor.errors import SnapvisorError
from snapvisor.image.compat import compat_record, check_compat
from snapvisor.image.restore import host_cpuid
from snapvisor.image.state_codec import decode_state
from snapvisor.machine import VM
from snapvisor.migrate.errors import MigrationError, StreamError
from snapvisor.migrate.pages import Layout, PageBatch, apply_batch, decompress_pages
from snapvisor.migrate.sender import STATE_HEADER
from snapvisor.migrate.stream import DEFAULT_IO_TIMEOUT_S, Channel, Msg, decode_json, parse_address
from snapvisor.store import Repository
from snapvisor.store.pagehash import PAGE_SIZE
from snapvisor.vmm.builder import build_microvm_from_state
from snapvisor.vmm.memory import FileBacking
from snapvisor.vmm.vm import Vm

log = logging.getLogger("snapvisor.migrate")
MAX_STATE = 64 << 20


@dataclass
class Received:
    """A migrated VM now running here, and what its arrival cost."""

    machine: VM
    paused_at: float  # the sender's pause (CLOCK_MONOTONIC)
    started_at: float  # the guest's start here (CLOCK_MONOTONIC)
    build_s: float
    pages: int
    bytes_received: int

    @property
    def downtime_s(self) -> float:
        return self.started_at - self.paused_at


class _Staging:
    """Guest RAM as it arrives: one memfd, regions back to back."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.fd = os.memfd_create("snapvisor-migration", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, max(layout.size, PAGE_SIZE))
            self._map = mmap.mmap(self.fd, layout.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(self.fd)
            raise MigrationError(f"cannot stage {layout.size >> 20} MiB of guest RAM here: {exc.strerror}") from None
        self.pages = np.frombuffer(self._map, dtype=np.uint8).reshape(layout.total_pages, PAGE_SIZE)

    def backing(self) -> dict[str, FileBacking]:
        path = Path(f"/proc/self/fd/{self.fd}")
        return {name: FileBacking(path, int(self.layout.first_page[i]) * PAGE_SIZE)
                for i, (name, _) in enumerate(self.layout.regions)}

    def close(self) -> None:
        del self.pages
        self._map.close()
        os.close(self.fd)


class _Base:
    """Pages of the base snapshot, read from the repository this host shares with the sender."""

    def __init__(self, repo: Repository, snapshot_id: str, layout: Layout, staging: _Staging) -> None:
        snapshot = repo.get_snapshot(snapshot_id)
        if [(name, snapshot.regions.get(name)) for name, _ in layout.regions] != layout.regions:
            raise MigrationError(f"snapshot {snapshot.info.short_id} has another memory layout than the VM")
        self.readers = [snapshot.region_reader(name) for name, _ in layout.regions]
        self.layout = layout
        self.staging = staging

    def fetch(self, pages: np.ndarray) -> None:
        for region, local in self.layout.split(np.sort(pages)):
            chunk = np.empty((len(local), PAGE_SIZE), dtype=np.uint8)
            self.readers[region].read_pages_into(local, chunk)
            self.staging.pages[local + int(self.layout.first_page[region])] = chunk


def _check_offer(offer: dict) -> Layout:
    regions = offer.get("regions")
    if not isinstance(offer.get("vm"), str) or not isinstance(regions, list) or not regions or not all(
        isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) and isinstance(r[1], int)
        and r[1] > 0 and r[1] % PAGE_SIZE == 0 for r in regions
    ):
        raise StreamError("the OFFER does not describe a VM (name and memory regions); the stream is corrupt")
    layout = Layout([(name, size) for name, size in regions])
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if layout.size > host:
        raise MigrationError(f"VM {offer['vm']} has {layout.size >> 20} MiB of RAM, more than this host's "
                             f"{host >> 20} MiB")
    return layout


def _open_base(offer: dict, repos: Sequence[Repository | str], layout: Layout,
               staging: _Staging) -> tuple[_Base | None, str]:
    """The offered base snapshot, from whichever of `repos` is the sender's
    repository, or None and the reason it cannot be used."""
    base = offer.get("base")
    if not base:
        return None, "the sender offered no base snapshot"
    if not repos:
        return None, "the receiver has no repository (--repo)"
    reasons = []
    for repo in repos:
        try:
            repository = repo if isinstance(repo, Repository) else Repository.open_url(repo)
            if repository.config["id"] == base.get("repository"):
                return _Base(repository, str(base.get("snapshot")), layout, staging), ""
            reasons.append(f"{repository.store.url} is not the sender's repository")
        except SnapvisorError as exc:
            reasons.append(str(exc))
    return None, "; ".join(reasons)


def _decode_state(payload: memoryview) -> tuple[float, dict]:
    if len(payload) < STATE_HEADER.size:
        raise StreamError("the STATE message is shorter than its header; the stream is corrupt")
    paused_at, kind, raw_len = STATE_HEADER.unpack_from(payload)
    if raw_len > MAX_STATE:
        raise StreamError(f"the VM state claims {raw_len} bytes; the stream is corrupt")
    raw = decompress_pages(kind, payload[STATE_HEADER.size:], raw_len)
    return paused_at, decode_state(bytes(raw))


def _build(state: dict, layout: Layout, staging: _Staging, name: str,
           serial_out: BinaryIO | int | None, serial_in: BinaryIO | int | None) -> Vm:
    try:
        saved = [(r["name"], r["size"]) for r in state["memory"]["regions"]]
        cpuid = state["vcpus"][0]["cpuid"]
    except (KeyError, IndexError, TypeError):
        raise StreamError("the VM state has no memory layout or vCPU; the stream is corrupt") from None
    if saved != layout.regions:
        raise StreamError(f"the VM state's memory layout {saved} is not the offered {layout.regions}")
    check_compat(compat_record(cpuid), host_cpuid(), f"of migrating VM {name}")
    return build_microvm_from_state(state, serial_out=serial_out, serial_in=serial_in,
                                    memory_backing=staging.backing())


def listen(address: str) -> socket.socket:
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise MigrationError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return sock


def receive(
    listener: socket.socket | str,
    *,
    repos: Sequence[Repository | str] = (),
    serial_out: BinaryIO | int | None = None,
    serial_in: BinaryIO | int | None = None,
    accept_timeout_s: float | None = None,
    io_timeout_s: float = DEFAULT_IO_TIMEOUT_S,
    on_connect: Callable[[str], None] | None = None,
) -> Received:
    """Accept one migration on `listener` (a listening socket or HOST:PORT) and
    return the VM, already running here. When one of `repos` is the sender's
    repository, pages of its base snapshot are read from there instead of the network."""
    sock = listen(listener) if isinstance(listener, str) else listener
    sock.settimeout(accept_timeout_s)
    try:
        conn, peer = sock.accept()
    except socket.timeout:
        raise MigrationError(f"no migration arrived within {accept_timeout_s:g} s") from None
    finally:
        if isinstance(listener, str):
            sock.close()
    channel = Channel(conn, f"{peer[0]}:{peer[1]}", io_timeout_s)
    if on_connect is not None:
        on_connect(channel.peer)
    staging: _Staging | None = None
    vm: Vm | None = None
    received_bytes = 0
    pages = 0
    try:
        channel.hello()
        offer = decode_json(channel.expect(Msg.OFFER), Msg.OFFER)
        layout = _check_offer(offer)
        name = offer["vm"]
        staging = _Staging(layout)
        base, reason = _open_base(offer, repos, layout, staging)
        channel.send_json(Msg.ACCEPT, {"base": base is not None, "reason": reason})
        while True:
            kind, payload = channel.recv()
            received_bytes += len(payload)
            if kind == Msg.PAGES:
                batch = PageBatch.decode(payload, layout.total_pages, base is not None)
                apply_batch(batch, staging.pages, base.fetch if base else None)
                pages += len(batch.data_pages) + len(batch.copy_dst) + len(batch.zero_pages) + len(batch.base_pages)
            elif kind == Msg.STATE:
                break
            elif kind == Msg.ERROR:
                raise MigrationError(f"{channel.peer} gave up: {decode_json(payload, kind).get('message', '?')}")
            else:
                raise StreamError(f"{channel.peer} sent {kind.name} during the page transfer; the stream is out of order")
        paused_at, state = _decode_state(payload)
        build_started = time.monotonic()
        vm = _build(state, layout, staging, name, serial_out, serial_in)
        build_s = time.monotonic() - build_started
        channel.send_json(Msg.READY, {"build_s": build_s, "pages": pages})
        channel.expect(Msg.GO)
        vm.start()
        started_at = time.monotonic()
    except BaseException as exc:
        channel.send_error(f"the receiver gave up: {exc or type(exc).__name__}")
        if vm is not None:
            vm.close()
        channel.close()
        if isinstance(exc, MigrationError):
            raise
        if isinstance(exc, SnapvisorError):
            raise MigrationError(f"incoming migration from {channel.peer} refused: {exc}") from None
        raise
    finally:
        if staging is not None:
            staging.close()  # the VM maps its own reference to the memfd
    try:
        # The guest runs here now; the sender stops its copy on this message (or
        # keeps it paused if the message is lost).
        channel.send_json(Msg.RESUMED, {"started_at": started_at, "build_s": build_s})
    except MigrationError as exc:
        log.warning("the sender did not get the resume confirmation (%s); the VM runs here", exc)
    finally:
        channel.close()
    return Received(VM(vm, name), paused_at, started_at, build_s, pages, received_bytes)
