"""The handover never leaves the guest running on two hosts (docs/migration.md,
"The handover"). The connection between sender and receiver is reset, or
silently stalled, at every message boundary and inside every message of the
protocol, in both directions (cut_proxy.py). After each cut exactly one host runs
the guest, or, only once GO may have gone out, the source is paused in
HandoverUnconfirmed while the target runs the guest or has discarded it. Never
both. The guest's round counter goes on exactly where it stopped, on whichever
host runs it.

Setting up is the slow part, so one VM moves back and forth between hosts A and B
across the cases: each case starts a receiver on the host that does not hold the
VM, and the VM's holder afterwards is whichever host runs it.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cut_proxy import BACK, OUT, Cut, CutProxy
from migrate_lab import (SWITCH_ADDRESS, Host, Process, Switch, assert_healthy, netns_available, rounds,
                         wait_for_verified_rounds)
from snapvisor.control import ApiClient, ControlError

pytestmark = pytest.mark.kvm

# The messages of a migration, in the order they first appear (the proxy checks
# this against a real migration in the first test): who sends each.
EXCHANGE = (
    (OUT, "hello"), (BACK, "hello"), (OUT, "OFFER"), (BACK, "ACCEPT"), (OUT, "PAGES"), (OUT, "SYNC"),
    (BACK, "SYNC"), (OUT, "STATE"), (BACK, "READY"), (OUT, "GO"), (BACK, "RESUMED"),
)
GO = EXCHANGE.index((OUT, "GO"))


def cut_points() -> list[Cut]:
    """Before and inside every message, and after the last one of each direction;
    each as a reset and as a stall."""
    points = [(direction, message, where) for direction, message in EXCHANGE for where in ("before", "inside")]
    for direction in (OUT, BACK):
        last = [message for d, message in EXCHANGE if d == direction][-1]
        points.append((direction, last, "after"))
    return [Cut(direction, message, where, mode) for mode in ("reset", "stall")
            for direction, message, where in points]


def position(cut: Cut) -> int:
    return EXCHANGE.index((cut.direction, cut.message))


def go_may_be_out(cut: Cut) -> bool:
    """The source has begun writing GO when the cut happens ('before GO': the proxy
    holds GO's first bytes)."""
    return position(cut) >= GO


def go_arrives_whole(cut: Cut) -> bool:
    return position(cut) > GO or (position(cut) == GO and cut.where == "after")


# 1 MiB working set, 32 pages re-dirtied per round: ~8 rounds a second, each
# followed by a check of every page.
GUEST = "console=ttyS0 tg.mem=1 tg.rate=1 tg.pages=32 tg.rounds=0"
# Both sides' --timeout: how long a stall lasts before it counts as a cut. Only
# stalls wait for it; the other cases take a longer one, which a starved process on
# this shared machine does not run into by chance.
STALL_TIMEOUT, TIMEOUT = "2s", "10s"
ATTEMPTS = 3
UNCONFIRMED = ("handover unconfirmed: the target may be running the VM; check it; `snapvisor resume --force` "
               "only if it is not")


@dataclass
class Served:
    """A `run` or `receive` process serving the VM on an API socket."""

    host: Host
    process: Process
    sock: Path

    def api(self) -> ApiClient:
        return ApiClient(self.sock, timeout=10)


class Lab:
    def __init__(self, switch: Switch, a: Host, b: Host, guest: Path) -> None:
        self.switch, self.a, self.b, self.guest = switch, a, b, guest
        self.cases = 0
        self.holder = self.boot()

    def boot(self) -> Served:
        sock = self.a.workdir / f"vm{self.cases}.sock"
        process = self.a.run(f"vm{self.cases}", ["run", "--kernel", str(self.guest), "--mem", "16M", "--cmdline",
                                                 GUEST, "--api-sock", str(sock), "--name", "mover", "--insecure"])
        wait_for_verified_rounds(process, 2, 60)
        return Served(self.a, process, sock)

    def healthy_holder(self) -> Served:
        """The VM's holder, running; a fresh VM on A when an earlier case broke it."""
        holder = self.holder
        try:
            if holder.process.popen.poll() is None and holder.api().vm()["state"] == "Running":
                return holder
        except Exception:  # noqa: BLE001 - any doubt: start over
            pass
        for host in (self.a, self.b):
            for process in host.processes:
                process.close()
        self.holder = self.boot()
        return self.holder

    def receive(self, host: Host, port: int, label: str, timeout: str) -> Served:
        sock = host.workdir / f"{label}.sock"
        process = host.run(label, ["receive", "--listen", f"{host.address}:{port}", "--timeout", timeout,
                                   "--api-sock", str(sock), "--insecure"])
        process.wait_for_stderr("waiting for a migration", 30)
        return Served(host, process, sock)

    def move(self, cut: Cut | None) -> tuple[Served, Served, Process, CutProxy, bool]:
        """Migrate the holder to a new receiver on the other host through a proxy
        applying `cut`: (source, target, the `migrate` process, the proxy, whether
        the target runs the guest at the end)."""
        timeout = STALL_TIMEOUT if cut is not None and cut.mode == "stall" else TIMEOUT
        for _ in range(ATTEMPTS):
            self.cases += 1
            source = self.healthy_holder()
            host = self.b if source.host is self.a else self.a
            port, proxy_port = 7100 + self.cases, 7500 + self.cases
            target = self.receive(host, port, f"receiver{self.cases}", timeout)
            with CutProxy(self.switch.ns, (SWITCH_ADDRESS, proxy_port), (host.address, port), cut) as proxy:
                mover = source.host.run(f"migrate{self.cases}", [
                    "migrate", "--api-sock", str(source.sock), "--to", f"{SWITCH_ADDRESS}:{proxy_port}",
                    "--timeout", timeout, "--max-time", "30s"])
                mover.wait(60)
                target_runs = target_outcome(target.process)
            assert proxy.error is None, proxy.error
            if cut is None or proxy.fired.is_set():
                return source, target, mover, proxy, target_runs
            # A starved process on this shared machine let a short --timeout expire
            # before the cut was reached: a failure before GO like any other (the
            # source runs on, the target discarded), and the case is tried again.
            assert mover.popen.returncode == 1 and not target_runs, mover.stderr()
            assert target.process.wait(30) != 0 and target.process.stdout() == b""
        raise AssertionError(f"{ATTEMPTS} migrations ended before the cut {cut} ({proxy.seen}): {mover.stderr()}")


def target_outcome(receiver: Process, timeout: float = 30) -> bool:
    """True once the receiver runs the guest, False once it gave up (and exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "migrated in and resumed" in receiver.stderr():
            return True
        if receiver.popen.poll() is not None:
            return False
        time.sleep(0.05)
    raise AssertionError(f"{receiver.label} neither ran the guest nor gave up: {receiver.stderr()}")


def assert_nothing_runs_it_here(source: Served) -> None:
    """In HandoverUnconfirmed, what would run the guest (a snapshot resumes what it
    paused) is refused, naming the target."""
    api = source.api()
    for request in (lambda: api.snapshot(str(source.host.workdir / "repo")), lambda: api.resume(),
                    lambda: api.migrate("192.0.2.99:7000")):
        with pytest.raises(ControlError, match="handover to .* that was not confirmed") as refusal:
            request()
        assert refusal.value.status == 409


def last_round(process: Process) -> int:
    return max(number for _, number, _ in rounds(process.stdout()))


def assert_one_counter(console: bytes) -> None:
    """Every round exactly once, in order, every page verified: one guest that never
    ran twice from the same point (a line cut by the pause is finished on the target)."""
    numbers = [number for _, number, _ in rounds(console)]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
    assert_healthy(console)


def assert_continues(source: Process, target: Process) -> None:
    """The target's guest goes on from the source's last round, without a boot."""
    assert b"snapvisor-testguest" not in target.stdout(), "the target booted the guest again"
    assert_one_counter(source.stdout() + target.stdout())


@pytest.fixture(scope="module")
def lab(tmp_path_factory, testguest: Path) -> Lab:
    unavailable = netns_available()
    if unavailable:
        pytest.skip(unavailable)
    switch = Switch(tmp_path_factory.mktemp("cuts"))
    hosts: list[Host] = []
    try:
        hosts.append(switch.host("a", "192.0.2.10"))
        hosts.append(switch.host("b", "192.0.2.20"))
        yield Lab(switch, hosts[0], hosts[1], testguest)
    finally:
        for host in hosts:
            host.close()
        switch.close()


def test_the_proxy_sees_the_protocol_and_passes_a_migration(lab: Lab) -> None:
    """Uncut, the migration goes through the proxy, and the messages it sees are
    EXCHANGE: the cut points below are the protocol's."""
    source, target, mover, proxy, target_runs = lab.move(None)
    assert mover.popen.returncode == 0 and target_runs, mover.stderr()
    for direction in (OUT, BACK):
        assert list(dict.fromkeys(proxy.seen[direction])) == [m for d, m in EXCHANGE if d == direction], proxy.seen
    assert source.process.wait(30) == 0
    wait_for_verified_rounds(target.process, 2, 30, after=last_round(source.process))
    assert_continues(source.process, target.process)
    lab.holder = target


@pytest.mark.parametrize("cut", cut_points(), ids=str)
def test_a_cut_never_leaves_the_guest_on_both_hosts(lab: Lab, cut: Cut) -> None:
    source, target, mover, proxy, target_runs = lab.move(cut)
    error = mover.stderr()
    state = "Moved" if mover.popen.returncode == 0 else source.api().vm()["state"]

    if not go_may_be_out(cut):
        # Before GO: the source resumes, the target discards everything.
        assert mover.popen.returncode == 1 and "the VM keeps running on this host" in error, error
        assert state == "Running" and not target_runs
    elif cut == Cut(BACK, "RESUMED", "after", cut.mode):
        # RESUMED arrived whole; a reset may still overtake it in the source's socket.
        assert (mover.popen.returncode, state) in ((0, "Moved"), (5, "HandoverUnconfirmed")), (state, error)
        assert target_runs
    else:
        # GO may be out: the source stays paused whatever happens, and says so.
        assert mover.popen.returncode == 5 and UNCONFIRMED in error, error
        assert state == "HandoverUnconfirmed"
        assert target_runs == go_arrives_whole(cut)
        assert_nothing_runs_it_here(source)

    if not target_runs:
        assert target.process.wait(30) != 0 and target.process.stdout() == b"", "the guest ran on the target"
    if state == "HandoverUnconfirmed" and not target_runs:
        # The operator checked: the target does not run it. Only a forced resume runs it here.
        refused = source.host.run(f"resume{lab.cases}", ["resume", "--api-sock", str(source.sock)])
        assert refused.wait(30) == 1 and "--force" in refused.stderr(), refused.stderr()
        forced = source.host.run(f"force{lab.cases}", ["resume", "--force", "--api-sock", str(source.sock)])
        assert forced.wait(30) == 0, forced.stderr()
        state = "Running"
    if state == "Running":
        wait_for_verified_rounds(source.process, 2, 30, after=last_round(source.process))
        assert_one_counter(source.process.stdout())
        return
    # The target runs the guest: it continues the source's rounds exactly, and the
    # source, read once the target has gone on, never ran a round beside it.
    wait_for_verified_rounds(target.process, 2, 30, after=last_round(source.process))
    assert_continues(source.process, target.process)
    if state == "HandoverUnconfirmed":
        source.api().shutdown()  # the operator checked: it runs on the target
    source.process.wait(30)
    lab.holder = target


def test_the_boot_form_keeps_an_unconfirmed_vm_paused_until_sigusr1(lab: Lab) -> None:
    """`migrate --kernel` has no API socket: after a GO cut halfway it says to
    resume with SIGUSR1, keeps the guest paused until then, and goes on after it."""
    a, b = lab.a, lab.b
    receiver = b.run("boot-receiver", ["receive", "--listen", f"{b.address}:7090", "--timeout", TIMEOUT,
                                       "--insecure"])
    receiver.wait_for_stderr("waiting for a migration", 30)
    with CutProxy(lab.switch.ns, (SWITCH_ADDRESS, 7490), (b.address, 7090), Cut(OUT, "GO", "inside", "reset")):
        sender = a.run("boot-sender", ["migrate", "--to", f"{SWITCH_ADDRESS}:7490", "--kernel", str(lab.guest),
                                       "--mem", "16M", "--cmdline", GUEST, "--on-signal", "--timeout", TIMEOUT,
                                       "--insecure"])
        wait_for_verified_rounds(sender, 2, 60)
        sender.signal(signal.SIGUSR1)
        error = sender.wait_for_stderr("handover unconfirmed", 60)
        assert not target_outcome(receiver) and receiver.stdout() == b""
    assert (f"handover unconfirmed: the target may be running the VM; check it; `kill -USR1 {sender.pid}` "
            f"only if it is not") in error, error
    paused = sender.stdout()
    time.sleep(0.5)  # eight rounds' time: a running guest would have printed some
    assert sender.stdout() == paused and sender.popen.poll() is None
    sender.signal(signal.SIGUSR1)
    sender.wait_for_stderr("resumed here by SIGUSR1", 30)
    wait_for_verified_rounds(sender, 2, 30, after=last_round(sender))
    assert_one_counter(sender.stdout())
    sender.signal(signal.SIGTERM)
    assert sender.wait(30) == 143
