"""`run --net` from the command line: every way to get a network device wrong
gives a clear error naming the thing and the fix, exits 1 (2 for a flag that
cannot be read) and changes nothing; `create` makes a missing tap and says so."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from netlab import TapHost, guest_cmdline, inside, wait_for_console
from snapvisor.vmm.devices.tap import Tap, interface_exists

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def run_net(host: TapHost, guest: Path, label: str, *nets: str, prefix: tuple[str, ...] = ()) -> tuple[int, str]:
    args = ["run", "--kernel", str(guest), "--mem", "32M", "--cmdline", guest_cmdline()]
    for net in nets:
        args += ["--net", net]
    process = host.run(label, args, prefix=list(prefix))
    code = process.wait(60)
    return code, process.stderr()


@pytest.mark.parametrize(
    "nets,code,message",
    [
        (["tap=svnone"], 1, "tap svnone does not exist on this host: create it (`ip tuntap add svnone mode tap"),
        (["tap=svbusy"], 1, "tap svbusy is in use by another process (another VM?)"),
        (["tap=lo"], 1, "lo is not a single-queue tap device: give the name of a tap"),
        (["tap=svfree,mac=02:00:00:00:00"], 1, "'02:00:00:00:00' is not a MAC address: write six hex pairs"),
        (["tap=svfree,mac=01:00:5e:00:00:01"], 1, "MAC 01:00:5e:00:00:01 is a multicast address"),
        (["tap=svfree,mac=02:00:00:00:00:01", "tap=svfree2,mac=02:00:00:00:00:01"], 1,
         "MAC 02:00:00:00:00:01 is given to two network devices: give each its own MAC"),
        (["tap=svfree", "tap=svfree"], 1, "tap svfree is given to two network devices: give each its own tap"),
        (["tap=a/b"], 1, "'a/b' is not a usable interface name"),
        (["svfree"], 2, "write tap=NAME[,mac=MAC][,create]"),
        (["tap=svfree,colour=red"], 2, "write tap=NAME[,mac=MAC][,create]"),
    ],
    ids=["missing", "busy", "not-a-tap", "malformed-mac", "multicast-mac", "same-mac", "same-tap", "bad-name",
         "no-tap-key", "unknown-key"],
)
def test_a_bad_network_device_gives_a_clear_error(testguest: Path, tap_hosts, nets: list[str], code: int,
                                                  message: str) -> None:
    host = tap_hosts("cli")
    for tap in ("svbusy", "svfree", "svfree2"):
        host.add_tap(tap)
    with inside(host.ns):
        holder = Tap.open("svbusy")  # another VM has it
    try:
        got, stderr = run_net(host, testguest, "bad", *nets)
    finally:
        holder.close()
    assert got == code and message in stderr and "Traceback" not in stderr, stderr
    with inside(host.ns):
        assert not interface_exists("svnone")  # nothing was created behind the operator's back


def test_no_permission_for_dev_net_tun_is_explained(testguest: Path, tap_hosts) -> None:
    host = tap_hosts("perm")
    host.add_tap("svtap0")
    # The kernel is checked before the taps: give nobody a copy it can read.
    readable = Path(tempfile.mkdtemp(prefix="snapvisor-nobody-"))
    readable.chmod(0o755)
    guest = readable / testguest.name
    shutil.copyfile(testguest, guest)
    guest.chmod(0o644)
    try:
        got, stderr = run_net(host, guest, "nobody", "tap=svtap0", prefix=tuple(NOBODY))
    finally:
        shutil.rmtree(readable)
    assert got == 1 and "Traceback" not in stderr, stderr
    assert "no permission to open /dev/net/tun for tap svtap0: run snapvisor as root or with CAP_NET_ADMIN" in stderr


def test_create_makes_a_missing_tap_and_says_so(testguest: Path, tap_hosts) -> None:
    host = tap_hosts("create")
    host.add_tap("svthere")
    vm = host.run("vm", ["run", "--kernel", str(testguest), "--mem", "32M", "--cmdline", guest_cmdline(),
                         "--net", "tap=svmade,create", "--net", "tap=svthere,create"])
    wait_for_console(vm, b"tg: net ok", 60)
    assert "created tap svmade (up, no address); it goes away when this VM exits" in vm.stderr()
    assert "svthere" not in vm.stderr()  # it existed: used as it is
    with inside(host.ns):
        assert interface_exists("svmade")
    vm.close()
    with inside(host.ns):
        assert not interface_exists("svmade") and interface_exists("svthere")
