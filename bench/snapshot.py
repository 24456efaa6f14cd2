"""Snapshot and restore benchmark: snapvisor next to QEMU in the same run.

    python3 bench/snapshot.py [--quick] [--pauses N] [--only pauses|heavy|rate|qemu]

Prints one JSON document (and, on stderr, every pause above its target with what
it was spent on); each case records the load average before and after it:
- pauses: incremental snapshots of a 1 GiB guest re-dirtying 0/16/64/256 MiB at
  full speed, asked every 200 ms, at least 30 per case (--pauses): median, p99 and
  max pause next to the target "5 ms + the pause's copy at the memcpy speed
  measured in this run", and the parts (stop, drain, copy, state, resume, time off
  CPU) of the three worst; the 64 MiB case again with a CPU-bound neighbour
  process (a Python busy loop);
- heavy: 2 vCPUs rewriting 64 MiB as fast as they can, snapshots asked every
  200 ms for 30 s, quiet and with the neighbour;
- snapshot_rate: snapshots back to back of a guest dirtying 10 and 50 MiB/s: the
  shortest interval it sustains (the RPO that can be promised);
- full_vs_qemu: a 1.25 GiB guest holding a 1 GiB synthetic image (half zero, a
  quarter random, a quarter compressible), snapshotted full by snapvisor and saved
  by QEMU (`migrate` to `zstd -1`, bandwidth cap lifted), then again after the
  guest dirtied ~1% of memory (snapvisor incremental, QEMU whole VM);
- restore: time to the guest's first instruction (lazy) and to full memory (eager).

Never the best of N: other work on the host shows in the tail, which is the point.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import snapvisor
from snapvisor.store import Repository
from snapvisor.testguest import build

MiB = 1 << 20
IMAGE_GPA = 256 * MiB
ROUND = re.compile(rb"tg: cpu=0 round=(\d+)")


def synthetic_image(size: int, seed: int = 7) -> np.ndarray:
    """Half zero pages, a quarter random, a quarter compressible (text-like), shuffled by page."""
    rng = np.random.default_rng(seed)
    pages = size // 4096
    image = np.zeros((pages, 4096), dtype=np.uint8)
    kinds = rng.permutation(np.repeat(np.arange(4), pages // 4))
    random_rows = np.flatnonzero(kinds == 2)
    image[random_rows] = rng.integers(0, 256, (len(random_rows), 4096), dtype=np.uint8)
    text_rows = np.flatnonzero(kinds == 3)
    words = rng.integers(97, 123, (len(text_rows), 512), dtype=np.uint8)
    image[text_rows] = np.repeat(words, 8, axis=1)
    return image.reshape(-1)


def memcpy_bandwidth() -> float:
    src = np.ones(256 * MiB, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    started = time.perf_counter()
    for _ in range(4):
        np.copyto(dst, src)
    return 4 * src.nbytes / (time.perf_counter() - started)


def wait_round(out: io.BytesIO, rounds: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(ROUND.findall(out.getvalue())) >= rounds:
            return
        time.sleep(0.01)
    raise RuntimeError(f"guest did not reach {rounds} rounds: {out.getvalue()[-500:]!r}")


PAUSE_PARTS = ("stop_s", "drain_s", "copy_s", "state_s", "resume_s", "waiting_s")


def pause_target_s(stats, bandwidth: float) -> float:
    """The issue's target: 5 ms plus the pause's copy at this run's memcpy speed."""
    return 0.005 + stats.paused_pages * 4096 / bandwidth


def parts_ms(stats) -> dict:
    parts = {name[:-2] + "_ms": round(getattr(stats, name) * 1e3, 2) for name in PAUSE_PARTS}
    parts["pause_ms"] = round(stats.pause_s * 1e3, 2)
    parts["copied_mib"] = round(stats.paused_pages * 4096 / MiB, 2)
    parts["kick_rounds"] = stats.stop_kick_rounds
    parts["unbuffered_mib"] = round(stats.unbuffered_pages * 4096 / MiB, 2)
    return parts


def distribution(case: str, samples: list, bandwidth: float) -> dict:
    """Median, p99 and max of the pauses, and the parts of the three worst; every
    pause above its target is printed (stderr) with what it was spent on."""
    pauses_ms = np.array([s.pause_s for s in samples]) * 1e3
    over = [s for s in samples if s.pause_s > pause_target_s(s, bandwidth)]
    for s in over:
        print(f"{case}: pause above target ({pause_target_s(s, bandwidth) * 1e3:.1f} ms): {parts_ms(s)}", file=sys.stderr)
    worst = sorted(samples, key=lambda s: s.pause_s, reverse=True)[:3]
    return {
        "count": len(samples),
        "pause_ms": {
            "median": round(float(np.median(pauses_ms)), 2),
            "p99": round(float(np.percentile(pauses_ms, 99)), 2),
            "max": round(float(pauses_ms.max()), 2),
        },
        "median_target_ms": round(float(np.median([pause_target_s(s, bandwidth) for s in samples])) * 1e3, 2),
        "over_target": len(over),
        "copied_in_pause_mib_median": round(float(np.median([s.paused_pages for s in samples])) * 4096 / MiB, 2),
        "precopied_mib_median": round(float(np.median([s.precopy_pages for s in samples])) * 4096 / MiB, 2),
        "snapshot_total_s_median": round(float(np.median([s.total_s for s in samples])), 3),
        "worst": [parts_ms(s) for s in worst],
    }


class Neighbour:
    """A CPU-bound process on the host (a busy loop), for the run under load."""

    def __enter__(self) -> Neighbour:
        self.proc = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def snapshot_series(vm, repo, count: int, interval: float, duration: float = 0.0) -> tuple[list, float]:
    """Snapshots asked every `interval` s (back to back when one takes longer), at
    least `count` of them and for at least `duration` s. Returns their stats and the
    elapsed time."""
    samples = []
    started = time.perf_counter()
    next_at = started
    while len(samples) < count or time.perf_counter() - started < duration:
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        next_at = max(next_at + interval, time.perf_counter())
        vm.snapshot(repo)
        samples.append(vm.last_snapshot)
    return samples, time.perf_counter() - started


def run_case(elf: Path, workdir: Path, name: str, cmdline: str, vcpus: int, bandwidth: float, pauses: int,
             neighbour: bool, interval: float = 0.2, duration: float = 0.0) -> dict:
    repo = Repository.open_url(str(workdir / name), create=True)
    out = io.BytesIO()
    load_before = load_average()
    with snapvisor.VM.boot(elf, mem="1G", vcpus=vcpus, cmdline=f"{cmdline} tg.rounds=0 tg.verify=1000000", serial_out=out) as vm:
        wait_round(out, 2)
        vm.snapshot(repo)  # the full one; the series measures incremental ones
        if neighbour:
            with Neighbour():
                samples, elapsed = snapshot_series(vm, repo, pauses, interval, duration)
        else:
            samples, elapsed = snapshot_series(vm, repo, pauses, interval, duration)
    result = {"case": name, "cmdline": cmdline, "vcpus": vcpus, "neighbour": neighbour,
              "load_average_before": load_before, "load_average_after": load_average()}
    result.update(distribution(name, samples, bandwidth))
    result["snapshots_per_s"] = round(len(samples) / elapsed, 2)
    result["mean_interval_s"] = round(elapsed / len(samples), 3)
    result["snapshot_total_s_max"] = round(max(s.total_s for s in samples), 3)
    return result


def bench_pauses(elf: Path, workdir: Path, bandwidth: float, sizes: list[int], pauses: int) -> list[dict]:
    """Incremental snapshots of a 1 GiB guest re-dirtying a working set of each size
    at full speed ("0": a 1 MiB set paced at 1 MiB/s), asked every 200 ms; the 64 MiB
    case again with a CPU-bound neighbour."""
    results = []
    for dirty_mib in sizes:
        params = f"tg.mem={dirty_mib} tg.rate=0" if dirty_mib else "tg.mem=1 tg.rate=1 tg.pages=16"
        for neighbour in (False, True) if dirty_mib == 64 else (False,):
            case = f"dirty-{dirty_mib}" + ("-neighbour" if neighbour else "")
            results.append(run_case(elf, workdir, case, params, 1, bandwidth, pauses, neighbour))
    return results


def bench_heavy(elf: Path, workdir: Path, bandwidth: float, pauses: int) -> list[dict]:
    """2 vCPUs rewriting 64 MiB as fast as they can, snapshots asked every 200 ms for
    30 s (and at least `pauses` of them), quiet and with a CPU-bound neighbour."""
    results = []
    for neighbour in (False, True):
        case = "heavy-2vcpu" + ("-neighbour" if neighbour else "")
        results.append(run_case(elf, workdir, case, "tg.mem=64 tg.rate=0 tg.cpus=2", 2, bandwidth, pauses,
                                neighbour, duration=30.0))
    return results


def bench_snapshot_rate(elf: Path, workdir: Path, bandwidth: float, rates: list[int], seconds: float) -> list[dict]:
    """The shortest sustainable snapshot interval (the RPO that can be promised) for a
    guest dirtying `rate` MiB/s: snapshots back to back for `seconds`; each one's
    total time (request to commit) is the interval it sustains."""
    results = []
    for rate in rates:
        case = f"rate-{rate}"
        result = run_case(elf, workdir, case, f"tg.mem=256 tg.rate={rate}", 1, bandwidth, 0, False,
                          interval=0.0, duration=seconds)
        results.append(result)
    return results


def _qmp(sock_path: Path):
    sock = socket.socket(socket.AF_UNIX)
    deadline = time.monotonic() + 30
    while True:
        try:
            sock.connect(str(sock_path))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    stream = sock.makefile("rwb")

    def command(name: str, **arguments) -> dict:
        stream.write(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        stream.flush()
        while True:
            reply = json.loads(stream.readline())
            if "event" in reply:  # kept: their timestamps time what QEMU did
                command.events.append(reply)
            if "return" in reply or "error" in reply:
                if "error" in reply:
                    raise RuntimeError(f"QMP {name}: {reply['error']}")
                return reply["return"]

    command.events = []
    json.loads(stream.readline())  # greeting
    command("qmp_capabilities")
    return command


def qemu_save(qmp, target: Path) -> dict:
    started = time.perf_counter()
    qmp("migrate", uri=f"exec:zstd -1 -q -f -o {target}")
    while True:
        status = qmp("query-migrate")
        if status.get("status") in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.005)
    seconds = time.perf_counter() - started
    if status["status"] != "completed":
        raise RuntimeError(f"QEMU migration {status['status']}: {status}")
    # QEMU stops the guest after saving it: let it run on for the next round.
    qmp("cont")
    return {"seconds": round(seconds, 3), "bytes": target.stat().st_size}


def bench_full_vs_qemu(elf: Path, workdir: Path, image: np.ndarray) -> dict:
    vm_mem = IMAGE_GPA + image.nbytes
    cmdline = "tg.mem=13 tg.rate=0 tg.rounds=0 tg.verify=1000000"
    # snapvisor: the image goes into guest RAM before the guest starts.
    repo = Repository.open_url(str(workdir / "full"), create=True)
    out = io.BytesIO()
    from snapvisor.vmm.builder import VmConfig, build_microvm_for_boot

    inner = build_microvm_for_boot(VmConfig(kernel=elf, cmdline=cmdline, mem_size=vm_mem, serial_out=out))
    inner.memory.view(IMAGE_GPA, image.nbytes)[:] = image
    vm = snapvisor.VM(inner, "bench-full")
    inner.start()
    try:
        wait_round(out, 2)
        started = time.perf_counter()
        full = vm.snapshot(repo)
        full_s = time.perf_counter() - started
        full_stats = vm.last_snapshot
        time.sleep(0.2)  # the guest re-dirties its 13 MiB (~1% of 1.25 GiB) meanwhile
        started = time.perf_counter()
        vm.snapshot(repo)
        incr_s = time.perf_counter() - started
        incr_stats = vm.last_snapshot
    finally:
        vm.close()
    snapvisor_result = {
        "full": {"seconds": round(full_s, 3), "bytes": full_stats.store["bytes_written"], "pause_ms": round(full_stats.pause_s * 1e3, 2)},
        "incremental_1pct": {"seconds": round(incr_s, 3), "bytes": incr_stats.store["bytes_written"], "pause_ms": round(incr_stats.pause_s * 1e3, 2)},
        "snapshot_id": full.id,
    }

    # QEMU: the same guest and image (loader device), saved with `migrate` through zstd -1.
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return {"snapvisor": snapvisor_result, "qemu": "qemu-system-x86_64 not installed"}
    image_file = workdir / "image.raw"
    image.tofile(image_file)
    qmp_sock = workdir / "qmp.sock"
    serial = workdir / "qemu-serial.log"
    proc = subprocess.Popen(
        [qemu, "-accel", "kvm", "-m", str(vm_mem // MiB), "-display", "none", "-monitor", "none",
         "-serial", f"file:{serial}", "-qmp", f"unix:{qmp_sock},server=on,wait=off",
         "-device", f"loader,file={image_file},addr={IMAGE_GPA:#x},force-raw=on",
         "-kernel", str(elf), "-append", cmdline],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        qmp = _qmp(qmp_sock)
        deadline = time.monotonic() + 120
        while len(ROUND.findall(serial.read_bytes() if serial.exists() else b"")) < 2:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"QEMU guest did not start: {proc.stderr.read().decode()[-500:] if proc.poll() is not None else ''}")
            time.sleep(0.05)
        qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        first = qemu_save(qmp, workdir / "qemu-1.zst")
        time.sleep(0.2)
        second = qemu_save(qmp, workdir / "qemu-2.zst")
        qmp("quit")
    finally:
        proc.kill()
        proc.wait()
    return {
        "snapvisor": snapvisor_result,
        "qemu": {"full": first, "again_after_1pct": second, "accel": "kvm"},
        "ratios": {
            "full_time_qemu_over_snapvisor": round(first["seconds"] / full_s, 2),
            "full_bytes_qemu_over_snapvisor": round(first["bytes"] / full_stats.store["bytes_written"], 2),
            "second_time_qemu_over_snapvisor": round(second["seconds"] / incr_s, 2),
            "second_bytes_qemu_over_snapvisor": round(second["bytes"] / max(1, incr_stats.store["bytes_written"]), 1),
        },
    }


def bench_restore(workdir: Path, snapshot_id: str, runs: int) -> dict:
    url = str(workdir / "full")
    lazy_started, lazy_first, lazy_full, eager = [], [], [], []
    for _ in range(runs):
        started = time.perf_counter()
        vm = snapvisor.restore(url, snapshot_id, lazy=True, serial_out=io.BytesIO())
        lazy_started.append(time.perf_counter() - started)
        # The guest's first instruction runs once the fault on its code page is served.
        while vm.lazy_memory.first_fault_served_at is None and not vm.lazy_memory.done:
            time.sleep(0.0002)
        lazy_first.append((vm.lazy_memory.first_fault_served_at or time.perf_counter()) - started)
        vm.lazy_memory.wait()
        lazy_full.append(time.perf_counter() - started)
        vm.close()
        started = time.perf_counter()
        vm = snapvisor.restore(url, snapshot_id, lazy=False, serial_out=io.BytesIO())
        eager.append(time.perf_counter() - started)
        vm.close()
    median = lambda xs: round(float(np.median(xs)) * 1e3, 1)  # noqa: E731
    return {
        "lazy_restore_call_ms": median(lazy_started),
        "lazy_to_first_instruction_ms": median(lazy_first),
        "lazy_to_full_memory_ms": median(lazy_full),
        "eager_to_first_instruction_ms": median(eager),
        "targets_ms": {"lazy_first_instruction": 20, "eager": 2000},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller image and fewer runs (a smoke run)")
    parser.add_argument("--pauses", type=int, default=30, help="incremental snapshots per pause case (default 30)")
    parser.add_argument("--only", choices=("pauses", "heavy", "rate", "qemu"), help="run one part only")
    args = parser.parse_args()
    elf = build()
    image_size = 256 * MiB if args.quick else 1024 * MiB
    with tempfile.TemporaryDirectory(prefix="snapvisor-bench-") as tmp:
        workdir = Path(tmp)
        bandwidth = memcpy_bandwidth()
        result = {"host": {"cpus": os.cpu_count(), "memcpy_gb_s": round(bandwidth / 1e9, 2),
                           "load_average": load_average()}}
        if args.only in (None, "pauses"):
            result["pauses"] = bench_pauses(elf, workdir, bandwidth, [0, 16] if args.quick else [0, 16, 64, 256], args.pauses)
        if args.only in (None, "heavy"):
            result["heavy"] = bench_heavy(elf, workdir, bandwidth, args.pauses)
        if args.only in (None, "rate"):
            result["snapshot_rate"] = bench_snapshot_rate(elf, workdir, bandwidth, [10, 50], 10.0 if args.quick else 30.0)
        if args.only in (None, "qemu"):
            full = bench_full_vs_qemu(elf, workdir, synthetic_image(image_size))
            result["full_vs_qemu"] = full
            result["restore"] = bench_restore(workdir, full["snapvisor"]["snapshot_id"], 1 if args.quick else 3)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
