"""Live migration, sending side (pre-copy).

1. Hello and offer (memory layout, optional base snapshot in a repository both
   hosts can read); the receiver says whether it can use that snapshot.
2. Round 0 sends every page while the guest runs; each later round sends the
   pages the guest dirtied during the previous one. Pages the receiver already
   holds are skipped, pages it can read from the base snapshot go as references.
3. When the pages left would cross the link within the downtime budget, the
   guest is paused, the last dirty pages and the VM state are sent, and the
   receiver builds the VM. On its READY the sender says GO and never resumes its
   copy by itself again; the receiver starts the guest and confirms with RESUMED,
   and the sender then stops its VM.

The handover follows the state machine of handover.py. Until the first byte of GO
is written, any failure (network, receiver refusing or dying, timeout) resumes the
guest here and raises MigrationError saying so; after it, a failure leaves the guest
paused here and raises HandoverUnconfirmed: only the operator can check whether
the receiver runs it.

A guest that dirties memory faster than the link carries it is throttled, and if
it still does not converge within `max_time_s`, the migration ends with an error
and the guest runs on here at full speed.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from queue import Queue

import numpy as np

from snapvisor.errors import SnapvisorError
from snapvisor.image.gather import gather_pages
from snapvisor.image.state_codec import encode_state
from snapvisor.machine import VM, Repo
from snapvisor.migrate.errors import HandoverUnconfirmed, MigrationError, StreamError
from snapvisor.migrate.handover import Event, Handover, State
from snapvisor.migrate.pages import Layout, PageBatch, ReceiverImage, compress_pages
from snapvisor.migrate.stream import DEFAULT_IO_TIMEOUT_S, STATE_HEADER, Channel, Msg, decode_json, frame_header
from snapvisor.migrate.throttle import Throttle
from snapvisor.migrate.tls import Protection
from snapvisor.migrate.warm import warm_up
from snapvisor.store import Repository
from snapvisor.store.pagehash import PAGE_SIZE
from snapvisor.store.reader import load_page_map

log = logging.getLogger("snapvisor.migrate")

BATCH_PAGES = 512  # 2 MiB per PAGES message: one zstd frame
FINAL_INLINE_PAGES = 2048  # a paused round up to this size is sent without the workers
WORKERS = 2
IN_FLIGHT = 4  # batches prepared ahead of the socket
# Share of the downtime target for the last pages; the rest is for the VM state
# and building the VM on the receiver.
PAGE_BUDGET_SHARE = 0.5
# A round is slow when the guest wrote more than this share of what the round
# sent (the dirty set is not shrinking fast enough); slow rounds step the throttle up.
DIRTY_SHARE_TO_THROTTLE = 0.5
SMALL_FINAL_PAGES = 64
RATE_SAMPLE_BYTES = 1 << 20
SHRINKING = 0.5
DEFAULT_DOWNTIME_MS = 50.0
DEFAULT_MAX_TIME_S = 120.0


@dataclass
class MigrationStats:
    """What a migration cost. Times are seconds; `downtime_s` runs from the pause
    on the sender to the guest's start on the receiver (CLOCK_MONOTONIC on both)."""

    total_s: float = 0.0
    downtime_s: float = 0.0
    precopy_s: float = 0.0
    rounds: int = 0
    bytes_sent: int = 0
    final_pages: int = 0
    base_used: bool = False
    throttle_share: float = 0.0
    pages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("data", "copied", "zero", "base", "unchanged"), 0))
    receiver: dict = field(default_factory=dict)
    downtime_parts: dict[str, float] = field(default_factory=dict)  # seconds per step of the downtime

    def as_dict(self) -> dict:
        return asdict(self)


def default_base(repo: Repository, vm_name: str) -> str | None:
    """The newest snapshot of `vm_name` in `repo`, or None."""
    mine = [info for info in repo.list_snapshots() if info.vm == vm_name]
    return mine[-1].id if mine else None


def base_page_ids(repo: Repository, snapshot_id: str, layout: Layout) -> np.ndarray:
    """Page ids of a snapshot in the layout's global numbering."""
    snapshot = repo.get_snapshot(snapshot_id)
    if [(name, snapshot.regions.get(name)) for name, _ in layout.regions] != layout.regions:
        raise MigrationError(f"snapshot {snapshot.info.short_id} has another memory and disk layout than the VM; "
                             f"it cannot serve as the migration's base")
    manifest = snapshot.manifest
    return np.concatenate([
        load_page_map(repo, manifest.map_block_pages, manifest.region_refs[name],
                      f"snapshot {snapshot.info.short_id} region {name!r}")[1]
        for name, _ in layout.regions
    ])


class _Sender:
    def __init__(self, machine: VM, channel: Channel, layout: Layout, stats: MigrationStats) -> None:
        self.machine = machine
        self.vm = machine.vm
        self.channel = channel
        self.layout = layout
        self.stats = stats
        # The VM's own Snapshotter: its dirty logs are the ones to drain (see drain).
        self.snapshotter = machine._snapshotter
        self.live = [np.frombuffer(view, dtype=np.uint8).reshape(-1, PAGE_SIZE)
                     for _, _, view in self.snapshotter.page_sources()]
        self.image: ReceiverImage | None = None
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="migrate")
        # Batch buffers are reused: a raw frame points into its buffer until sent,
        # and fresh 2 MiB allocations would cost a page fault per page.
        self.buffers: Queue[np.ndarray] = Queue()
        for _ in range(IN_FLIGHT + WORKERS + 1):
            self.buffers.put(np.empty((BATCH_PAGES, PAGE_SIZE), dtype=np.uint8))
        # Bytes per second that reached the receiver and were applied, from the
        # last round that carried enough to measure (zero and unchanged pages
        # cost nothing on the wire, so pages per second would mislead).
        self.wire_bytes_per_s = 0.0
        self.handover_state = Handover("source")

    def drain(self) -> np.ndarray:
        """Global numbers of the pages (and disk blocks) written since the last
        drain. The VM's snapshot lineages get them too, so snapshots after a
        failed migration still contain every page the guest wrote."""
        fresh = self.snapshotter.drain_dirty()
        return np.flatnonzero(np.concatenate([fresh[name] for name, _ in self.layout.regions]))

    def _prepare(self, region: int, local: np.ndarray, in_round: np.ndarray | None
                 ) -> tuple[bytes, list, PageBatch, dict, np.ndarray]:
        """Copy, plan, compress and frame one batch (on a worker thread)."""
        buffer = self.buffers.get()
        chunk = buffer[:len(local)]
        gather_pages(self.live[region], local, chunk)
        pages = local + int(self.layout.first_page[region])
        assert self.image is not None
        batch, counts = (self.image.plan_final(pages, chunk) if in_round is None
                         else self.image.plan(pages, chunk, in_round))
        parts = batch.encode()
        return frame_header(Msg.PAGES, parts), parts, batch, counts, buffer

    def send_final(self, pages: np.ndarray) -> None:
        """Send the last pages while the guest is paused. A small set is done on
        this thread: handing batches to workers and back costs two thread wake-ups
        each, which on a busy host is more than the work."""
        if len(pages) > FINAL_INLINE_PAGES:
            self.send_round(pages, final=True)
            return
        for region, local in self.layout.split(pages):
            for start in range(0, len(local), BATCH_PAGES):
                header, parts, _, counts, buffer = self._prepare(region, local[start:start + BATCH_PAGES], None)
                self.channel.send_framed(header, parts)
                self.buffers.put(buffer)
                self.stats.pages["data"] += counts["data"]

    def send_round(self, pages: np.ndarray, final: bool = False) -> None:
        """Send `pages` (sorted global numbers) as they are now; `final` when the
        guest is paused (nothing is tracked after it)."""
        started = time.perf_counter()
        sent_before = self.channel.bytes_sent
        in_round = None
        if not final:
            in_round = np.zeros(self.layout.total_pages, dtype=bool)
            in_round[pages] = True
        pending: deque[Future] = deque()

        def flush(until: int) -> None:
            while len(pending) > until:
                header, parts, batch, counts, buffer = pending.popleft().result()
                self.channel.send_framed(header, parts)
                self.buffers.put(buffer)
                if not final:
                    assert self.image is not None
                    self.image.remember(batch)
                for key, value in counts.items():
                    self.stats.pages[key] += value

        for region, local in self.layout.split(pages):
            for start in range(0, len(local), BATCH_PAGES):
                pending.append(self.pool.submit(self._prepare, region, local[start:start + BATCH_PAGES], in_round))
                flush(IN_FLIGHT)
        flush(0)
        if not final:
            # Wait until the receiver has applied the round: the socket buffers
            # megabytes, and the round's time must be the link's, not the buffer's.
            marker = self.stats.rounds.to_bytes(4, "little")
            self.channel.send(Msg.SYNC, marker)
            if self.channel.expect(Msg.SYNC) != marker:
                raise StreamError(f"{self.channel.peer} answered another round's SYNC; the stream is out of order")
        elapsed = time.perf_counter() - started
        if self.channel.bytes_sent - sent_before >= RATE_SAMPLE_BYTES:
            self.wire_bytes_per_s = (self.channel.bytes_sent - sent_before) / max(elapsed, 1e-6)

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def precopy(self, budget_s: float, max_time_s: float, auto_converge: bool, throttle: Throttle,
                started: float) -> np.ndarray:
        """Rounds while the guest runs; returns the pages dirtied since the last one."""
        self.drain()  # round 0 sends everything: earlier writes need no record
        pages = np.arange(self.layout.total_pages)
        slow_rounds = 0
        while True:
            round_started = time.monotonic()
            sent_before = self.channel.bytes_sent
            self.send_round(pages)
            self.stats.rounds += 1
            if throttle.error is not None:
                raise MigrationError(f"the guest could not be throttled: {throttle.error}")
            status = self.vm.wait(0)
            if status is not None:
                raise MigrationError(f"VM {self.machine.name} stopped during the migration: {status.message}")
            sent = len(pages)
            pages = self.drain()
            round_s = time.monotonic() - round_started
            round_bytes = self.channel.bytes_sent - sent_before
            # Stop once the rest fits the budget, unless it still shrinks fast: one
            # more short round then usually leaves much less for the pause.
            # (Every page counted as incompressible: the estimate errs on the safe side.)
            if len(pages) * PAGE_SIZE / max(self.wire_bytes_per_s, 1.0) <= budget_s and (
                    len(pages) <= SMALL_FINAL_PAGES or len(pages) > SHRINKING * sent):
                return pages
            if time.monotonic() - started > max_time_s:
                raise MigrationError(
                    f"pre-copy did not converge in {max_time_s:g} s: the guest dirtied {len(pages)} pages "
                    f"({len(pages) * PAGE_SIZE / round_s / 1e6:.1f} MB/s) during the last round while the link "
                    f"carried {round_bytes / round_s / 1e6:.1f} MB/s (throttled to {throttle.share:.0%}); give a "
                    f"larger downtime target or time limit, or migrate when the guest is quieter"
                )
            slow = len(pages) * PAGE_SIZE > DIRTY_SHARE_TO_THROTTLE * max(round_bytes, 1)
            slow_rounds = slow_rounds + 1 if slow else 0
            # Two slow rounds start the throttle; once on, each slow round steps it up.
            if auto_converge and slow_rounds >= (1 if throttle.share else 2):
                throttle.step_up()
                slow_rounds = 0

    def handover(self, pages: np.ndarray) -> None:
        """Pause, send the rest and the VM state, and let the receiver start the
        guest; `handover_state` follows each step."""
        paused_at = time.monotonic()
        self.vm.pause()
        self.handover_state.on(Event.PAUSE)
        marks = [("pause", time.monotonic())]
        # The pages of the last drain plus those written until the pause. (A mask,
        # not np.union1d: numpy imports that lazily, ~10 ms on its first call.)
        final_mask = np.zeros(self.layout.total_pages, dtype=bool)
        final_mask[pages] = True
        final_mask[self.drain()] = True
        final = np.flatnonzero(final_mask)
        self.send_final(final)
        self.stats.final_pages = len(final)
        marks.append(("final_pages", time.monotonic()))
        state = encode_state(self.vm.save_state())
        kind, packed = compress_pages(np.frombuffer(state, dtype=np.uint8))
        self.channel.send(Msg.STATE, STATE_HEADER.pack(paused_at, kind, len(state)), packed)
        marks.append(("state", time.monotonic()))
        self.stats.receiver = decode_json(self.channel.expect(Msg.READY), Msg.READY)
        marks.append(("receiver_build", time.monotonic()))
        # From the first byte of GO on, the receiver may start the guest: this side
        # must not resume it by itself any more, even if GO is cut halfway.
        self.handover_state.on(Event.WRITE_GO)
        self.channel.send(Msg.GO)
        resumed = decode_json(self.channel.expect(Msg.RESUMED), Msg.RESUMED)
        started_at = float(resumed["started_at"])
        self.handover_state.on(Event.GOT_RESUMED)
        marks.append(("receiver_start", started_at))
        self.stats.downtime_s = started_at - paused_at
        self.stats.downtime_parts = {name: round(at - prev, 6) for (name, at), (_, prev)
                                     in zip(marks, [("", paused_at)] + marks)}
        self.stats.receiver.update(resumed)


def migrate(
    machine: VM,
    to: str,
    *,
    repo: Repo | None = None,
    base: str | None = None,
    downtime_ms: float = DEFAULT_DOWNTIME_MS,
    max_time_s: float = DEFAULT_MAX_TIME_S,
    auto_converge: bool = True,
    io_timeout_s: float = DEFAULT_IO_TIMEOUT_S,
    protection: Protection = Protection(),
    server_name: str | None = None,
) -> MigrationStats:
    """Move the running `machine` to `snapvisor receive` at `to` (HOST:PORT).

    With `repo`, pages equal to those of `base` (default: this VM's newest snapshot
    there) are read by the receiver from that repository instead of crossing the
    link. On success the VM is ended here (`VM.moved_away`: exit reason 'migrated')
    and runs on the receiver. On a failure before GO it keeps running here and
    MigrationError says what happened; on one after GO may have gone out it stays
    paused here and HandoverUnconfirmed says so. `io_timeout_s` bounds every wait
    on the connection. Nothing else may pause or snapshot the VM meanwhile.

    With TLS in `protection` the receiver's certificate must chain to its CA and
    name `server_name` (default: the host of `to`); the handshake is done before
    anything of the VM is sent. Without TLS, `to` must be loopback or
    `protection.insecure` set."""
    if downtime_ms <= 0 or max_time_s <= 0:
        raise MigrationError("the downtime target and the time limit must be positive")
    if not machine.vm.running:
        raise MigrationError(f"VM {machine.name} is not running; only a running VM can be migrated")
    if machine.lazy_memory is not None:
        machine.lazy_memory.wait_complete()  # pages are read from guest RAM: all must be resident
    started = time.monotonic()
    stats = MigrationStats()
    base_offer, base_ids, id_key = None, None, None
    try:
        # Guest RAM regions, then disks (disk-<name>): everything a snapshot stores.
        layout = Layout([(name, size) for name, size, _ in machine._snapshotter.page_sources()])
        if repo is not None:
            repository = repo if isinstance(repo, Repository) else Repository.open_url(repo)
            base = base or default_base(repository, machine.name)
            if base is not None:
                base_ids, id_key = base_page_ids(repository, base, layout), repository.crypto.id_key
                base_offer = {"repository": repository.config["id"], "snapshot": repository.resolve(base)}
        warm_up()
        channel = Channel.connect(to, io_timeout_s, protection, server_name)
    except SnapvisorError as exc:
        # Nothing has touched the guest yet; say so as every later failure does.
        raise MigrationError(f"migration to {to} failed, the VM keeps running on this host: {exc}") from None
    sender = _Sender(machine, channel, layout, stats)
    throttle = Throttle(machine.vm)
    try:
        channel.hello()
        channel.send_json(Msg.OFFER, {"vm": machine.name, "regions": layout.regions, "config": machine.vm.config,
                                      "base": base_offer, "downtime_ms": downtime_ms})
        accepted = decode_json(channel.expect(Msg.ACCEPT), Msg.ACCEPT)
        stats.base_used = bool(accepted.get("base")) and base_ids is not None
        if base_offer and not stats.base_used:
            log.warning("the receiver cannot use base snapshot %s (%s); sending every page",
                        base_offer["snapshot"][:12], accepted.get("reason"))
        sender.image = ReceiverImage(layout, base_ids if stats.base_used else None, id_key if stats.base_used else None)
        budget_s = downtime_ms / 1000 * PAGE_BUDGET_SHARE
        pages = sender.precopy(budget_s, max_time_s, auto_converge, throttle, started)
        throttle.stop()
        stats.throttle_share = throttle.share
        stats.precopy_s = time.monotonic() - started
        sender.handover(pages)
    except BaseException as exc:
        throttle.stop()
        # Once GO may be out, the receiver may run the guest, even when the
        # connection is reset at once (a NAT or firewall resets it while the
        # receiver lives on): resuming here too could make two copies.
        if sender.handover_state.on(Event.FAILED) is State.UNCONFIRMED:
            raise HandoverUnconfirmed(to, str(exc) or type(exc).__name__) from None
        channel.send_error(str(exc) or type(exc).__name__)
        machine.vm.resume()
        if isinstance(exc, SnapvisorError):
            raise MigrationError(f"migration to {to} failed, the VM keeps running on this host: {exc}") from None
        raise
    finally:
        sender.close()
        channel.close()
        stats.bytes_sent = channel.bytes_sent
    machine.moved_away(to)
    stats.total_s = time.monotonic() - started
    return stats
