"""`snapvisor demo`: the whole product in one minute on the project's test guest.

Boots the test guest, snapshots it full and then incrementally into a local
repository while it runs, stops it as if the server were lost, restores the
newest snapshot (lazily: the guest runs before its memory is read) and shows the
guest carrying on from where it was and finding every page it owns intact.
"""

from __future__ import annotations

import io
import re
import sys
import time
from pathlib import Path
from typing import TextIO

from snapvisor.errors import SnapvisorError
from snapvisor.machine import VM, restore
from snapvisor.store import Repository
from snapvisor.testguest import build

_ROUND = re.compile(rb"tg: cpu=0 round=(\d+) dirtied=(\d+) verified=(\d+)")
_GUEST_ARGS = "console=ttyS0 tg.mem=64 tg.rate=32 tg.pages=2048 tg.rounds=0"


class DemoError(SnapvisorError):
    """The demo guest did not behave as expected."""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _wait_rounds(console: io.BytesIO, count: int, timeout: float = 60.0) -> list[tuple[int, int, int]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = console.getvalue()
        if b"VERIFY FAIL" in text or b"FAULT" in text:
            raise DemoError("the guest reported damaged memory:\n" + text.decode(errors="replace")[-600:])
        found = [tuple(int(g) for g in m.groups()) for m in _ROUND.finditer(text)]
        if len(found) >= count:
            return found
        time.sleep(0.02)
    raise DemoError(f"the guest printed fewer than {count} rounds in {timeout:.0f} s")


def run_demo(repo_url: str, out: TextIO = sys.stdout) -> None:
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    say("snapvisor demo: building the test guest ...")
    kernel: Path = build()
    repo = Repository.open_url(repo_url, create=True)
    say(f"repository: {repo_url}")

    console = io.BytesIO()
    say(f"booting the test guest (256 MiB RAM; it fills 64 MiB and re-dirties it at 32 MiB/s: {_GUEST_ARGS})")
    with VM.boot(kernel, mem="256M", cmdline=_GUEST_ARGS, serial_out=console, name="demo") as vm:
        first = _wait_rounds(console, 3)
        say(f"  guest running: round {first[-1][0]}, every round checks all {first[-1][2]} pages it owns")

        full = vm.snapshot(repo, tags=["demo"])
        stats = vm.last_snapshot
        say(
            f"full snapshot {full.id[:12]}: {stats.total_s:.2f} s, guest paused {stats.pause_s * 1e3:.1f} ms, "
            f"stored {_mib(stats.store['bytes_written'])} for {_mib(256 << 20)} of RAM"
        )
        time.sleep(1.0)
        incremental = vm.snapshot(repo, tags=["demo"])
        stats = vm.last_snapshot
        at_snapshot = _wait_rounds(console, 1)[-1][0]
        say(
            f"incremental snapshot {incremental.id[:12]}: {stats.total_s:.2f} s, guest paused "
            f"{stats.pause_s * 1e3:.1f} ms, stored {_mib(stats.store['bytes_written'])} "
            f"({stats.paused_pages + stats.precopy_pages} dirtied pages)"
        )
        say(f"  the guest was at round {at_snapshot}; stopping it now, as if the server were lost")
        vm.stop()

    console = io.BytesIO()
    started = time.perf_counter()
    with restore(repo, incremental.id, lazy=True, serial_out=console) as restored:
        say(f"restored {incremental.id[:12]} lazily in {(time.perf_counter() - started) * 1e3:.0f} ms (memory streams in behind the guest)")
        resumed = _wait_rounds(console, 3)
        assert restored.lazy_memory is not None
        restored.lazy_memory.wait()
        say(f"  guest resumed at round {resumed[0][0]} and went on to round {resumed[-1][0]};")
        say(f"  each round re-checked all {resumed[-1][2]} pages against their seeds: no mismatch")
        for line in console.getvalue().decode(errors="replace").splitlines()[:3]:
            say(f"  | {line}")
        restored.stop()

    say("snapshots in the repository:")
    for info in repo.list_snapshots():
        say(f"  {info.id[:12]}  {info.time:%Y-%m-%d %H:%M:%S}  vm={info.vm}  {info.meta.get('kind', '?')}  parent={(info.parent or '-')[:12]}")
    say("demo finished: the restored guest carried on with its memory intact")
