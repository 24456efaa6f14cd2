"""Linux guests on a hardware-style KVM: snapvisor next to QEMU-KVM in the same lab.

    scripts/lab run python3 bench/linux.py [--runs N] [--vcpus N]

Runs inside the lab's L1 (scripts/lab, docs/lab.md), where /dev/kvm is AMD SVM
with nested paging emulated by QEMU TCG: absolute times are those of that machine,
the ratios are what carries over. Prints one JSON document:

- boot_to_userspace: seconds from starting the VMM process to the guest's first
  userspace line (`GUEST userspace`), and the guest's own uptime printed in it (the
  difference is the VMM's start and, for QEMU, its firmware). Debian's cloud kernel,
  the lab's initramfs with guest.mode=userspace, 512 MiB, --vcpus N. QEMU -accel
  kvm and snapvisor boot the same bzImage (QEMU through its firmware); snapvisor
  also boots the ELF vmlinux decompressed on the host, its usual path. Runs
  alternate, so that load from other users of the machine falls on all of them
  alike. Target: snapvisor within 1.3x of QEMU.
- snapshot: pauses of a full and of incremental snapshots of a 512 MiB guest
  running the sqlite3 and memory workload on its ext4 root disk.
- restore: a snapshot restored eagerly (restore() returns a started VM) and lazily
  (to the first guest page fault served), as time to the first instruction.

Each section reports median, p99 and max, and L1's 1-minute load average at its end
(the host's is not visible from L1: note it beside the figures).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import snapvisor

USERSPACE = re.compile(rb"GUEST userspace uptime=(\d+\.\d+)")
ROWS = re.compile(rb"^WL rows=(\d+)\r?$", re.M)
CMDLINE = "console=ttyS0 panic=-1 reboot=k quiet"
MEM_MIB = 512
BOOT_TIMEOUT_S = 600


def lab_dir() -> Path:
    folder = os.environ.get("SNAPVISOR_LAB_DIR")
    if not folder:
        sys.exit("bench/linux.py runs in the lab: scripts/lab run python3 bench/linux.py")
    return Path(folder)


def summary(values: list[float]) -> dict:
    return {"median": round(float(np.median(values)), 4), "p99": round(float(np.percentile(values, 99)), 4),
            "max": round(max(values), 4), "runs": len(values)}


def seconds_to_userspace(argv: list[str]) -> tuple[float, float]:
    """Starts a VMM; returns the seconds until the guest's first userspace line and the
    guest's own uptime in it (the rest is the VMM's start and the firmware), then ends it."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = threading.Event()
    output = bytearray()

    def read() -> None:
        while chunk := process.stdout.read1(65536):
            output.extend(chunk)
            if USERSPACE.search(output) and not seen.is_set():
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not seen.wait(BOOT_TIMEOUT_S):
            raise RuntimeError(f"{argv[0]} booted no userspace: {bytes(output[-2000:]).decode(errors='replace')}")
        return time.perf_counter() - started, float(USERSPACE.search(output)[1])
    finally:
        process.kill()
        process.wait()


def bench_boot(lab: Path, runs: int, vcpus: int) -> dict:
    cmdline = f"{CMDLINE} guest.mode=userspace"
    snapvisor_cli = [sys.executable, "-m", "snapvisor", "run", "--initrd", str(lab / "guest-initrd.gz"),
                     "--mem", f"{MEM_MIB}M", "--vcpus", str(vcpus), "--cmdline", cmdline]
    contenders = {
        "qemu_kvm_bzimage": ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-smp", str(vcpus),
                             "-m", str(MEM_MIB), "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
                             "-kernel", str(lab / "guest-vmlinuz"), "-initrd", str(lab / "guest-initrd.gz"),
                             "-append", cmdline],
        "snapvisor_bzimage": [*snapvisor_cli, "--kernel", str(lab / "guest-vmlinuz")],
        "snapvisor_vmlinux": [*snapvisor_cli, "--kernel", str(lab / "guest-vmlinux")],
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    uptimes: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, argv in contenders.items():
            wall, uptime = seconds_to_userspace(argv)
            times[name].append(wall)
            uptimes[name].append(uptime)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import snapvisor.cli"], check=True)
    result = {name: {**summary(values), "guest_uptime_s": summary(uptimes[name])} for name, values in times.items()}
    result["snapvisor_python_start_s"] = round(time.perf_counter() - started, 3)
    qemu = result["qemu_kvm_bzimage"]["median"]
    result["snapvisor_bzimage_over_qemu"] = round(result["snapvisor_bzimage"]["median"] / qemu, 2)
    result["snapvisor_vmlinux_over_qemu"] = round(result["snapvisor_vmlinux"]["median"] / qemu, 2)
    result["target_ratio"] = 1.3
    result["vcpus"] = vcpus
    result["l1_load_average_1m_at_end"] = os.getloadavg()[0]
    return result


def wait_rows(out: io.BytesIO, above: int) -> int:
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while time.monotonic() < deadline:
        counts = [int(n) for n in ROWS.findall(out.getvalue())]
        if counts and counts[-1] > above:
            return counts[-1]
        time.sleep(0.2)
    raise RuntimeError(f"the workload did not pass {above} rows: {out.getvalue()[-2000:].decode(errors='replace')}")


def bench_snapshot_restore(lab: Path, workdir: Path, runs: int) -> tuple[dict, dict]:
    disk = workdir / "root.img"
    shutil.copyfile(lab / "root.img", disk)
    repo = str(workdir / "repo")
    out = io.BytesIO()
    vm = snapvisor.VM.boot(lab / "guest-vmlinux", mem=f"{MEM_MIB}M", initrd=lab / "guest-initrd.gz",
                           cmdline=f"{CMDLINE} wl.rows=1000000", serial_out=out, disks=[disk], name="bench-linux")
    try:
        count = wait_rows(out, 0)
        full = vm.snapshot(repo)
        full_pause = vm.last_snapshot.pause_s
        incremental = []
        for _ in range(runs):
            count = wait_rows(out, count)  # the workload committed more rows since
            vm.snapshot(repo)
            incremental.append(vm.last_snapshot.pause_s)
        newest = vm.last_snapshot
    finally:
        vm.stop()
        vm.close()
    snapshot = {"guest_mib": MEM_MIB, "full_pause_s": round(full_pause, 4), "incremental_pause_s": summary(incremental),
                "incremental_bytes_written": newest.store.get("bytes_written"),
                "l1_load_average_1m_at_end": os.getloadavg()[0]}

    eager, lazy = [], []
    for run in range(runs):
        for mode in ("eager", "lazy"):
            (workdir / f"{mode}-{run}").mkdir()
        started = time.perf_counter()
        restored = snapvisor.restore(repo, full.id, serial_out=io.BytesIO(), disk_dir=workdir / f"eager-{run}")
        eager.append(time.perf_counter() - started)
        restored.stop()
        restored.close()
        started = time.perf_counter()
        restored = snapvisor.restore(repo, full.id, lazy=True, serial_out=io.BytesIO(),
                                     disk_dir=workdir / f"lazy-{run}")
        # The guest's first instruction runs once the fault on its code page is served.
        while restored.lazy_memory.first_fault_served_at is None and not restored.lazy_memory.done:
            time.sleep(0.0002)
        lazy.append((restored.lazy_memory.first_fault_served_at or time.perf_counter()) - started)
        restored.stop()
        restored.close()
    restore = {"guest_mib": MEM_MIB, "eager_to_first_instruction_s": summary(eager),
               "lazy_to_first_instruction_s": summary(lazy), "l1_load_average_1m_at_end": os.getloadavg()[0]}
    return snapshot, restore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement (default 3)")
    parser.add_argument("--vcpus", type=int, default=1, help="vCPUs of the booted guests (default 1)")
    args = parser.parse_args()
    lab = lab_dir()
    result = {"host": {"cpus": os.cpu_count(), "kvm": "lab L1: QEMU TCG, AMD SVM with nested paging"},
              "boot_to_userspace": bench_boot(lab, args.runs, args.vcpus)}
    with tempfile.TemporaryDirectory(prefix="snapvisor-bench-linux-") as tmp:
        result["snapshot"], result["restore"] = bench_snapshot_restore(lab, Path(tmp), args.runs)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
