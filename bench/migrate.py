"""Live migration benchmark: snapvisor next to QEMU in the same run.

    flock /tmp/snapvisor-bench.lock python3 bench/migrate.py [--quick]

A 1 GiB test guest (512 MiB working set, every page non-zero) dirtying memory at
several rates is moved between two processes on this machine's loopback link:
`snapvisor migrate` -> `snapvisor receive` (plaintext, and over mutual TLS 1.3 with a
CA and host certificate made for the run), and `qemu-system-x86_64` (source, QMP
`migrate`) -> `qemu-system-x86_64 -incoming tcp:...` (downtime limit 50 ms,
bandwidth cap lifted, otherwise QEMU's defaults). For each: total time, downtime
and bytes sent. snapvisor's downtime runs from the sender's pause to the guest's
start on the receiver (CLOCK_MONOTONIC of both processes); QEMU's the same span,
from the source's STOP event to the destination's RESUME event (QMP timestamps),
next to the source-side downtime QEMU reports itself. The guest on the destination must go on and verify every page.

The test guest's slowest dirtying is 1 MiB/s (tg.rate is whole MiB/s), so the
"0" row is that floor. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "migrate"))
from snapshot import _qmp as qmp_connect  # noqa: E402  (QMP client shared with the snapshot benchmark)
from tls_certs import Ca  # noqa: E402  (the migration tests' certificate maker)

from snapvisor.testguest import build  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MEM_MIB = 1024
WORKING_SET_MIB = 512
ROUND = re.compile(rb"tg: cpu=0 round=(\d+) dirtied=\d+ verified=(\d+)")
DOWNTIME_TARGET_MS = 50


def guest_cmdline(rate_mib: int) -> str:
    # Rounds of about a second (rate x 256 pages), a full verification every other round.
    rate = max(rate_mib, 1)
    pages = 16 if rate_mib == 0 else rate * 256
    return f"console=ttyS0 tg.mem={WORKING_SET_MIB} tg.rate={rate} tg.pages={pages} tg.rounds=0 tg.verify=2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(path: Path, predicate, timeout: float, what: str, process: subprocess.Popen | None = None) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = path.read_bytes() if path.exists() else b""
        if b"VERIFY FAIL" in data or b"FAULT" in data:
            raise RuntimeError(f"{what}: the guest failed: {data[-500:]!r}")
        if predicate(data):
            return data
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {process.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not within {timeout} s: {path.read_bytes()[-500:] if path.exists() else b''!r}")


def verified_rounds(console: bytes, after: int = -1) -> int:
    return sum(1 for m in ROUND.finditer(console) if int(m.group(1)) > after and int(m.group(2)))


def last_round(console: bytes) -> int:
    numbers = [int(m.group(1)) for m in ROUND.finditer(console)]
    return max(numbers) if numbers else -1


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def bench_snapvisor(elf: Path, rate: int, workdir: Path, tls: list[str] | None = None) -> dict:
    """One move; `tls`: the --tls-* flags both ends get (None: plaintext on loopback)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    case = f"{'tls' if tls else 'plain'}-{rate}"
    b_out, b_err = workdir / f"sv-b-{case}.out", workdir / f"sv-b-{case}.err"
    a_out, a_err = workdir / f"sv-a-{case}.out", workdir / f"sv-a-{case}.err"
    receiver = subprocess.Popen([sys.executable, "-m", "snapvisor", "receive", "--listen", f"127.0.0.1:{port}",
                                 "--json", *(tls or [])], stdout=b_out.open("wb"), stderr=b_err.open("wb"), env=env)
    sender = subprocess.Popen([sys.executable, "-m", "snapvisor", "migrate", "--to", f"127.0.0.1:{port}",
                               "--kernel", str(elf), "--mem", f"{MEM_MIB}M", "--cmdline", guest_cmdline(rate),
                               "--on-signal", "--json", "--downtime-ms", str(DOWNTIME_TARGET_MS), *(tls or [])],
                              stdout=a_out.open("wb"), stderr=a_err.open("wb"), env=env)
    try:
        wait_for(b_err, lambda d: b"waiting for a migration" in d, 30, "snapvisor receiver", receiver)
        wait_for(a_out, lambda d: verified_rounds(d) >= 2, 180, "snapvisor source warm-up", sender)
        sender.send_signal(signal.SIGUSR1)
        if sender.wait(300):
            raise RuntimeError(f"snapvisor migrate failed: {a_err.read_text()[-1500:]}")
        stats = next(json.loads(line.removeprefix("snapvisor: ")) for line in reversed(a_err.read_text().splitlines())
                     if line.startswith("snapvisor: {"))
        after = last_round(a_out.read_bytes())
        wait_for(b_out, lambda d: verified_rounds(d, after) >= 1, 120, "snapvisor destination guest", receiver)
    finally:
        stop(sender, receiver)
    return {
        "total_s": round(stats["total_s"], 3),
        "downtime_ms": round(stats["downtime_s"] * 1000, 2),
        "bytes_sent": stats["bytes_sent"],
        "rounds": stats["rounds"],
        "final_pages": stats["final_pages"],
        "throttle_share": stats["throttle_share"],
        "downtime_parts_ms": {k: round(v * 1000, 2) for k, v in stats["downtime_parts"].items()},
    }


def qemu_argv(qemu: str, accel: str, elf: Path, rate: int, serial: Path, qmp: Path) -> list[str]:
    return [qemu, "-accel", accel, "-m", str(MEM_MIB), "-display", "none", "-monitor", "none",
            "-serial", f"file:{serial}", "-qmp", f"unix:{qmp},server=on,wait=off",
            "-device", "isa-debug-exit,iobase=0x501,iosize=1", "-kernel", str(elf),
            "-append", guest_cmdline(rate)]


def bench_qemu(qemu: str, accel: str, elf: Path, rate: int, workdir: Path) -> dict:
    port = free_port()
    src_serial, dst_serial = workdir / f"q-a-{rate}.log", workdir / f"q-b-{rate}.log"
    src_qmp, dst_qmp = workdir / f"q-a-{rate}.qmp", workdir / f"q-b-{rate}.qmp"
    dest = subprocess.Popen(qemu_argv(qemu, accel, elf, rate, dst_serial, dst_qmp)
                            + ["-incoming", f"tcp:127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=(workdir / f"q-b-{rate}.err").open("wb"))
    source = subprocess.Popen(qemu_argv(qemu, accel, elf, rate, src_serial, src_qmp),
                              stdout=subprocess.DEVNULL, stderr=(workdir / f"q-a-{rate}.err").open("wb"))
    try:
        wait_for(src_serial, lambda d: verified_rounds(d) >= 2, 180, "QEMU source warm-up", source)
        qmp_dest = qmp_connect(dst_qmp)
        qmp = qmp_connect(src_qmp)
        qmp("migrate-set-parameters", **{"downtime-limit": DOWNTIME_TARGET_MS, "max-bandwidth": 1 << 40})
        qmp("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            status = qmp("query-migrate")
            if status.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.01)
        if status["status"] != "completed":
            raise RuntimeError(f"QEMU migration {status['status']}: {status}")
        after = last_round(src_serial.read_bytes())
        wait_for(dst_serial, lambda d: verified_rounds(d, after) >= 1, 120, "QEMU destination guest", dest)
        qmp_dest("query-status")  # reads the RESUME event queued before its answer
    finally:
        stop(source, dest)
    # End to end as for snapvisor: the source's STOP event to the destination's
    # RESUME event (QMP timestamps, this machine's clock in both processes).
    stopped = _event_time(qmp.events, "STOP")
    resumed = _event_time(qmp_dest.events, "RESUME")
    return {
        "total_s": round(status["total-time"] / 1000, 3),
        "downtime_ms": round((resumed - stopped) * 1000, 2),
        "downtime_reported_ms": float(status["downtime"]),
        "bytes_sent": status["ram"]["transferred"],
        "rounds": status["ram"].get("dirty-sync-count"),
    }


def _event_time(events: list[dict], name: str) -> float:
    """Seconds (wall clock) of the last QMP event `name`."""
    stamp = [e["timestamp"] for e in events if e["event"] == name][-1]
    return stamp["seconds"] + stamp["microseconds"] / 1e6


def qemu_accel(qemu: str, elf: Path, workdir: Path) -> str:
    """kvm when QEMU's KVM runs the guest here, else tcg."""
    probe = subprocess.run([qemu, "-accel", "kvm", "-m", "64", "-display", "none", "-monitor", "none",
                            "-serial", f"file:{workdir / 'probe.log'}", "-device", "isa-debug-exit,iobase=0x501,iosize=1",
                            "-kernel", str(elf), "-append", "tg.mem=4 tg.rounds=1"], capture_output=True, timeout=120)
    return "kvm" if probe.returncode == 1 and b"tg: done" in (workdir / "probe.log").read_bytes() else "tcg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the 10 MiB/s rate")
    parser.add_argument("--rates", default="0,10,50", help="dirty rates in MiB/s (default: 0,10,50)")
    parser.add_argument("--no-qemu", action="store_true", help="only snapvisor (plaintext and TLS)")
    args = parser.parse_args()
    rates = [10] if args.quick else [int(r) for r in args.rates.split(",")]
    elf = build()
    qemu = None if args.no_qemu else shutil.which("qemu-system-x86_64")
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-migrate-") as tmp:
        workdir = Path(tmp)
        accel = qemu_accel(qemu, elf, workdir) if qemu else None
        host = Ca(workdir, "bench").issue("host", "127.0.0.1")  # both ends on this machine: one certificate
        tls = ["--tls-cert", str(host.cert), "--tls-key", str(host.key), "--tls-ca", str(host.ca)]
        for rate in rates:
            row: dict = {"dirty_mib_s": rate, "snapvisor": bench_snapvisor(elf, rate, workdir),
                         "snapvisor_tls": bench_snapvisor(elf, rate, workdir, tls)}
            plain, secure = row["snapvisor"], row["snapvisor_tls"]
            row["tls_over_plaintext"] = {
                "downtime": round(secure["downtime_ms"] / max(plain["downtime_ms"], 1e-3), 2),
                "total_time": round(secure["total_s"] / max(plain["total_s"], 1e-6), 2),
            }
            if qemu:
                row["qemu"] = bench_qemu(qemu, accel, elf, rate, workdir)
                sv, qm = row["snapvisor"], row["qemu"]
                row["qemu_over_snapvisor"] = {
                    "downtime": round(qm["downtime_ms"] / max(sv["downtime_ms"], 1e-3), 2),
                    "total_time": round(qm["total_s"] / max(sv["total_s"], 1e-6), 2),
                    "bytes": round(qm["bytes_sent"] / max(sv["bytes_sent"], 1), 2),
                }
            results.append(row)
    ten = next((r for r in results if r["dirty_mib_s"] == 10), None)
    print(json.dumps({
        "guest": {"mem_mib": MEM_MIB, "working_set_mib": WORKING_SET_MIB, "vcpus": 1},
        "link": "loopback (127.0.0.1), both VMMs on this machine",
        "downtime_target_ms": DOWNTIME_TARGET_MS,
        "downtime_measured_as": {
            "snapvisor": "sender's pause() to receiver's vm.start() returning, CLOCK_MONOTONIC of both processes",
            "qemu": "the source's STOP event to the destination's RESUME event (QMP timestamps); "
                    "downtime_reported_ms is what query-migrate reports (source side only, whole ms)",
        },
        "load_average_at_start": load_at_start,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "qemu": {"binary": qemu, "accel": accel} if qemu else "qemu-system-x86_64 not installed",
        "results": results,
        "targets": {
            "downtime_under_50ms_at_10": None if ten is None else ten["snapvisor"]["downtime_ms"] < 50,
            "tls_downtime_under_50ms_at_every_rate": all(r["snapvisor_tls"]["downtime_ms"] < 50 for r in results),
            "tls_total_time_within_1.15x_of_plaintext_at_every_rate": all(
                r["tls_over_plaintext"]["total_time"] <= 1.15 for r in results),
            "downtime_below_qemu_at_every_rate": all(
                r["snapvisor"]["downtime_ms"] < r["qemu"]["downtime_ms"] for r in results if "qemu" in r) if qemu else None,
        },
    }, indent=2))


if __name__ == "__main__":
    main()
