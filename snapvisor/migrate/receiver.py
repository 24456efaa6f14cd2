"""Live migration, receiving side.

On the OFFER the receiver creates the VM's parts (KVM VM, vCPUs, RAM, devices,
new disk images): pages arrive straight into its RAM and disk blocks into its
images. When the VM state arrives (the guest is paused on the sender), only the
state is restored, so neither creating the VM nor copying a page falls into the
downtime; the receiver then reports READY, waits for GO, starts the guest and
confirms RESUMED (the target's side of handover.py).
A stream that breaks, stalls or turns out corrupt before a whole, valid GO leaves
nothing running here; after it, the guest runs here whether or not RESUMED gets out.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np

from snapvisor.errors import SnapvisorError
from snapvisor.image.compat import check_compat, compat_record
from snapvisor.image.disks import REGION_PREFIX as DISK_PREFIX
from snapvisor.image.restore import host_cpuid
from snapvisor.image.state_codec import decode_state
from snapvisor.machine import VM
from snapvisor.migrate.errors import MigrationError, StreamError
from snapvisor.migrate.handover import Event, Handover
from snapvisor.migrate.pages import Layout, PageBatch, apply_batch, decompress_pages
from snapvisor.migrate.stream import DEFAULT_IO_TIMEOUT_S, STATE_HEADER, Channel, Msg, decode_json, parse_address
from snapvisor.migrate.tls import Protection, TlsRefused
from snapvisor.migrate.warm import warm_up
from snapvisor.store import Repository
from snapvisor.store.pagehash import PAGE_SIZE
from snapvisor.vmm.builder import NetRestoreOptions, PreparedMicrovm, build_microvm_from_state
from snapvisor.vmm.memory import GuestMemory
from snapvisor.vmm.vm import Vm

log = logging.getLogger("snapvisor.migrate")
MAX_STATE = 64 << 20
DISK_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")  # what a disk name may be: it becomes a file name


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
    """Where pages go until the VM runs: guest RAM straight into the prepared
    VM's memory, each disk straight into its new sparse image in `disk_dir`."""

    def __init__(self, layout: Layout, disk_dir: Path | None) -> None:
        self.layout = layout
        self.arrays: list[np.ndarray | None] = [None] * len(layout.regions)
        self.disk_paths: dict[str, Path] = {}
        self._maps: list[mmap.mmap] = []
        disks = [name[len(DISK_PREFIX):] for name, _ in layout.regions if name.startswith(DISK_PREFIX)]
        if disks and disk_dir is None:
            raise MigrationError(f"the VM has disks ({', '.join(disks)}): give the receiver a directory for their "
                                 f"images (--disk-dir DIR, or disk_dir=)")
        try:
            for index, (name, size) in enumerate(layout.regions):
                if name.startswith(DISK_PREFIX):
                    assert disk_dir is not None
                    self.arrays[index] = self._new_disk(name[len(DISK_PREFIX):], size, disk_dir)
        except BaseException:
            self.close(keep_disks=False)
            raise

    def attach_memory(self, memory: GuestMemory) -> None:
        regions = {region.name: region for region in memory.regions}
        for index, (name, size) in enumerate(self.layout.regions):
            if not name.startswith(DISK_PREFIX):
                region = regions.get(name)
                if region is None or region.size != size:
                    raise StreamError(f"the offered RAM region {name} ({size} bytes) is not one this VM has; "
                                      f"the stream is corrupt")
                self.arrays[index] = np.frombuffer(region.view, dtype=np.uint8).reshape(-1, PAGE_SIZE)

    def _map(self, fd: int, size: int, what: str) -> np.ndarray:
        try:
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise MigrationError(f"cannot stage {size >> 20} MiB of {what} here: {exc.strerror}") from None
        self._maps.append(mapping)
        return np.frombuffer(mapping, dtype=np.uint8).reshape(-1, PAGE_SIZE)

    def _new_disk(self, disk: str, size: int, disk_dir: Path) -> np.ndarray:
        if not DISK_NAME.fullmatch(disk):
            raise StreamError(f"the OFFER names a disk {disk!r}, which is not a disk name; the stream is corrupt")
        path = Path(disk_dir) / f"{disk}.img"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise MigrationError(f"{path} already exists; receive disks into an empty directory "
                                 f"(or remove the file)") from None
        except OSError as exc:
            raise MigrationError(f"cannot create disk image {path}: {exc.strerror}") from None
        self.disk_paths[disk] = path
        try:
            os.ftruncate(fd, size)
            return self._map(fd, size, f"disk {disk}")
        finally:
            os.close(fd)

    def put(self, pages: np.ndarray, rows: np.ndarray) -> None:
        for region, local, at in self.layout.locate(pages):
            self.arrays[region][local] = rows[at]

    def get(self, pages: np.ndarray) -> np.ndarray:
        rows = np.empty((len(pages), PAGE_SIZE), dtype=np.uint8)
        for region, local, at in self.layout.locate(pages):
            rows[at] = self.arrays[region][local]
        return rows

    def close(self, keep_disks: bool) -> None:
        """Unmap the disks; their images stay only when the VM uses them."""
        self.arrays.clear()
        for mapping in self._maps:
            mapping.close()
        self._maps.clear()
        if not keep_disks:
            for path in self.disk_paths.values():
                path.unlink(missing_ok=True)


class _Base:
    """Pages of the base snapshot, read from the repository this host shares with the sender."""

    def __init__(self, repo: Repository, snapshot_id: str, layout: Layout, staging: _Staging) -> None:
        snapshot = repo.get_snapshot(snapshot_id)
        if [(name, snapshot.regions.get(name)) for name, _ in layout.regions] != layout.regions:
            raise MigrationError(f"snapshot {snapshot.info.short_id} has another memory and disk layout than the VM")
        self.readers = [snapshot.region_reader(name) for name, _ in layout.regions]
        self.layout = layout
        self.staging = staging

    def fetch(self, pages: np.ndarray) -> None:
        for region, local, at in self.layout.locate(pages):
            rows = np.empty((len(local), PAGE_SIZE), dtype=np.uint8)
            self.readers[region].read_pages_into(local, rows)
            self.staging.put(pages[at], rows)


def _check_offer(offer: dict) -> tuple[Layout, dict]:
    """The layout and VM configuration an OFFER describes, once they make sense."""
    regions, config = offer.get("regions"), offer.get("config")
    if not isinstance(offer.get("vm"), str) or not isinstance(regions, list) or not regions or not all(
        isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) and isinstance(r[1], int)
        and r[1] > 0 and r[1] % PAGE_SIZE == 0 for r in regions
    ) or not isinstance(config, dict):
        raise StreamError("the OFFER does not describe a VM (name, memory regions, configuration); "
                          "the stream is corrupt")
    layout = Layout([(name, size) for name, size in regions])
    disks = config.get("disks", [])
    memory = sum(size for name, size in layout.regions if not name.startswith(DISK_PREFIX))
    if not isinstance(config.get("vcpus"), int) or config.get("mem_size") != memory or not isinstance(disks, list) \
            or not all(isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("readonly"), bool)
                       for d in disks) \
            or sorted(DISK_PREFIX + d["name"] for d in disks) != sorted(
                name for name, _ in layout.regions if name.startswith(DISK_PREFIX)):
        raise StreamError("the OFFER's VM configuration does not match its memory and disks; the stream is corrupt")
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if memory > host:
        raise MigrationError(f"VM {offer['vm']} has {memory >> 20} MiB of RAM, more than this host's "
                             f"{host >> 20} MiB")
    return layout, config


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


def _build(state: dict, staging: _Staging, prepared: PreparedMicrovm, name: str, cpuid_here: bytes) -> Vm:
    try:
        memory = {r["name"]: r["size"] for r in state["memory"]["regions"]}
        cpuid = state["vcpus"][0]["cpuid"]
    except (KeyError, IndexError, TypeError):
        raise StreamError("the VM state has no memory layout or vCPU; the stream is corrupt") from None
    offered = {n: size for n, size in staging.layout.regions if not n.startswith(DISK_PREFIX)}
    if memory != offered:
        raise StreamError(f"the VM state's memory {memory} is not the offered {offered}; the stream is corrupt")
    check_compat(compat_record(cpuid), cpuid_here, f"of migrating VM {name}")
    return build_microvm_from_state(state, prepared=prepared)


def listen(address: str, protection: Protection = Protection()) -> socket.socket:
    """A socket listening on `address`; plaintext only where `protection` allows it."""
    host, port = parse_address(address)
    protection.check_address(host, f"listening on {address}")
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


def _accept(sock: socket.socket, protection: Protection, accept_timeout_s: float | None, io_timeout_s: float,
            on_refused: Callable[[str], None] | None) -> tuple[socket.socket, str]:
    """The next connection whose TLS handshake (if any) succeeds, and its peer."""
    deadline = None if accept_timeout_s is None else time.monotonic() + accept_timeout_s
    while True:
        sock.settimeout(None if deadline is None else max(deadline - time.monotonic(), 1e-3))
        try:
            conn, address = sock.accept()
        except socket.timeout:
            raise MigrationError(f"no migration arrived within {accept_timeout_s:g} s") from None
        peer = f"{address[0]}:{address[1]}"
        try:
            return protection.accept(conn, peer, io_timeout_s), peer
        except TlsRefused as exc:
            # Nothing of the migration was read: the listener stays for a peer that can prove who it is.
            (on_refused or log.warning)(str(exc))


def receive(
    listener: socket.socket | str,
    *,
    repos: Sequence[Repository | str] = (),
    serial_out: BinaryIO | int | None = None,
    serial_in: BinaryIO | int | None = None,
    accept_timeout_s: float | None = None,
    io_timeout_s: float = DEFAULT_IO_TIMEOUT_S,
    on_connect: Callable[[str], None] | None = None,
    disk_dir: Path | str | None = None,
    name: str | None = None,
    net: NetRestoreOptions | None = None,
    protection: Protection = Protection(),
    on_refused: Callable[[str], None] | None = None,
) -> Received:
    """Accept one migration on `listener` (a listening socket or HOST:PORT) and
    return the VM, already running here. When one of `repos` is the sender's
    repository, pages of its base snapshot are read from there instead of the network.
    The VM's disks are written as new images `disk_dir/<name>.img`. The VM keeps
    the sender's name unless `name` gives another (its name in snapshots).

    With TLS in `protection`, only a sender whose certificate chains to its CA gets
    past the handshake; a peer that fails it is reported to `on_refused` and the
    listener waits for the next one. Any failure after the handshake ends the call."""
    sock = listen(listener, protection) if isinstance(listener, str) else listener
    try:
        if not isinstance(listener, str):
            protection.check_address(sock.getsockname()[0], f"receiving on {sock.getsockname()[0]}")
        conn, peer = _accept(sock, protection, accept_timeout_s, io_timeout_s, on_refused)
    finally:
        if isinstance(listener, str):
            sock.close()
    channel = Channel(conn, peer, io_timeout_s, "sender")
    if on_connect is not None:
        on_connect(channel.peer)
    staging: _Staging | None = None
    prepared: PreparedMicrovm | None = None
    vm: Vm | None = None
    handover = Handover("target")
    received_bytes = 0
    pages = 0
    try:
        channel.hello()
        offer = decode_json(channel.expect(Msg.OFFER), Msg.OFFER)
        layout, config = _check_offer(offer)
        offered_name = offer["vm"]
        staging = _Staging(layout, Path(disk_dir) if disk_dir is not None else None)
        # Creating the VM now keeps it out of the downtime; its RAM is the staging area.
        prepared = PreparedMicrovm(config, serial_out, serial_in, disk_paths=staging.disk_paths, net=net)
        staging.attach_memory(prepared.memory)
        cpuid_here = host_cpuid()  # asked now: it opens /dev/kvm, which is slow for the downtime
        warm_up()
        base, reason = _open_base(offer, repos, layout, staging)
        channel.send_json(Msg.ACCEPT, {"base": base is not None, "reason": reason})
        while True:
            kind, payload = channel.recv()
            received_bytes += len(payload)
            if kind == Msg.PAGES:
                batch = PageBatch.decode(payload, layout.total_pages, base is not None)
                apply_batch(batch, staging, base.fetch if base else None)
                pages += len(batch.data_pages) + len(batch.copy_dst) + len(batch.zero_pages) + len(batch.base_pages)
            elif kind == Msg.SYNC:
                channel.send(Msg.SYNC, payload)
            elif kind == Msg.STATE:
                break
            elif kind == Msg.ERROR:
                raise MigrationError(f"{channel.peer} gave up: {decode_json(payload, kind).get('message', '?')}")
            else:
                raise StreamError(f"{channel.peer} sent {kind.name} during the page transfer; the stream is out of order")
        paused_at, state = _decode_state(payload)
        build_started = time.monotonic()
        vm = _build(state, staging, prepared, offered_name, cpuid_here)
        prepared = None  # the VM owns its parts now
        build_s = time.monotonic() - build_started
        channel.send_json(Msg.READY, {"build_s": build_s, "pages": pages})
        handover.on(Event.SENT_READY)
        if len(channel.expect(Msg.GO)):
            raise StreamError("the GO message carries a payload; the stream is corrupt")
        vm.start()
        started_at = time.monotonic()
        handover.on(Event.GOT_GO)
    except BaseException as exc:
        handover.on(Event.FAILED)
        channel.send_error(str(exc) or type(exc).__name__)
        if vm is not None:
            vm.close()
        if prepared is not None:
            prepared.close()
        if staging is not None:
            staging.close(keep_disks=False)
        channel.close()
        if isinstance(exc, MigrationError):
            raise
        if isinstance(exc, SnapvisorError):
            raise MigrationError(f"incoming migration from {channel.peer} refused: {exc}") from None
        raise
    staging.close(keep_disks=True)  # the VM opened its disk images itself
    try:
        # The guest runs here now; the sender stops its copy on this message (or
        # keeps it paused if the message is lost).
        channel.send_json(Msg.RESUMED, {"started_at": started_at, "build_s": build_s})
    except MigrationError as exc:
        handover.on(Event.RESUMED_LOST)
        log.warning("the sender did not get the resume confirmation (%s); the VM runs here", exc)
    finally:
        channel.close()
    return Received(VM(vm, name or offered_name), paused_at, started_at, build_s, pages, received_bytes)
