"""virtio-blk benchmark: the guest's disk writes next to the same writes from the
host, and what an incremental disk snapshot stores next to what the guest wrote.

    flock /tmp/snapvisor-bench.lock python3 bench/disk.py [--quick]

Prints one JSON document:
- guest_vs_host: 4 KiB writes, sequential and random, by the test guest to its
  virtio-blk disk (one request per block through the polled driver: a
  QueueNotify exit served in the vCPU thread) next to 4 KiB pwrite()s of the
  same pattern to a file of the same size from a host C program (fio-style,
  bench/disk_pwrite.c) and `dd bs=4k`; all go through the page cache.
- notify_exit: the cost of one QueueNotify MMIO exit alone (a guest loop writing
  the register of a device whose queue is not live): the part of a request
  that ioeventfd could take off, next to the whole request.
- incremental_snapshot: a guest writes random 4 KiB blocks over a 64 MiB disk
  between two snapshots; blocks and bytes the second (incremental) snapshot
  stored for the disk next to the bytes the guest wrote in between (the device
  counts them; sampled as each snapshot returns, so within a few ms).
- lazy_restore: a VM whose 256 MiB disk is full of data (random: it neither
  compresses nor dedups), snapshotted, then restored: time from the restore()
  call to the guest's first instruction, lazy (memory and disk come in behind
  the guest; the first fault served is its first instruction) next to eager
  (restore() returns once memory and disk are written and the guest started),
  and the lazy restore's time until the whole disk was in.
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
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vmm"))  # the hand-assembled guest helper

import snapvisor  # noqa: E402
from flat_guest import elf_image  # noqa: E402
from snapvisor.image.disks import attached_disks  # noqa: E402
from snapvisor.store import PAGE_SIZE, Repository  # noqa: E402
from snapvisor.testguest import build  # noqa: E402
from snapvisor.vmm.builder import VmConfig, build_microvm_for_boot  # noqa: E402
from snapvisor.vmm.devices.blockfile import DiskConfig  # noqa: E402
from snapvisor.vmm.devices.virtio.mmio import MMIO_BASE, Reg  # noqa: E402

MiB = 1 << 20
DISK_SIZE = 64 * MiB
DISK_BLOCKS = DISK_SIZE // PAGE_SIZE
DISK_ROUND = re.compile(rb"tg: disk round=(\d+) written=(\d+) verified=(\d+) ticks=(\d+)")
RESTORE_DISK_SIZE = 256 * MiB
# tiny memory workload: the rounds are the disk's
BASE_CMDLINE = f"console=ttyS0 tg.mem=1 tg.pages=1 tg.disk=1 tg.diskblocks={DISK_BLOCKS} tg.diskverify=1000000"


def blank_image(path: Path) -> Path:
    with path.open("wb") as file:
        file.truncate(DISK_SIZE)
    return path


def guest_writes(elf: Path, workdir: Path, sequential: bool, rounds: int, per_round: int) -> dict:
    image = blank_image(workdir / f"guest-{'seq' if sequential else 'rand'}.img")
    out = io.BytesIO()
    cmdline = f"{BASE_CMDLINE} tg.diskseq={int(sequential)} tg.diskwrites={per_round} tg.rounds={rounds}"
    vm = snapvisor.VM.boot(elf, mem="64M", cmdline=cmdline, serial_out=out, disks=[image])
    try:
        status = vm.wait(600)
    finally:
        vm.close()
    lines = [tuple(int(g) for g in m.groups()) for m in DISK_ROUND.finditer(out.getvalue())]
    if status is None or status.code != 0 or len(lines) != rounds + 1:
        raise SystemExit(f"guest run failed ({status}): {out.getvalue()[-800:]!r}")
    written = sum(w for _, w, _, _ in lines) * PAGE_SIZE
    seconds = (lines[-1][3] - lines[0][3]) / 1000  # guest timer ticks (1 kHz PIT)
    return {"bytes": written, "seconds": seconds, "mb_s": round(written / seconds / 1e6, 1),
            "iops": round(written / PAGE_SIZE / seconds)}


def host_pwrite(tool: Path, workdir: Path, sequential: bool, count: int) -> dict:
    image = blank_image(workdir / f"host-{'seq' if sequential else 'rand'}.img")
    mode = "seq" if sequential else "rand"
    seconds = float(subprocess.run([str(tool), str(image), mode, str(DISK_BLOCKS), str(count)],
                                   check=True, capture_output=True, text=True).stdout)
    written = count * PAGE_SIZE
    return {"bytes": written, "seconds": round(seconds, 4), "mb_s": round(written / seconds / 1e6, 1),
            "iops": round(count / seconds)}


def host_dd(workdir: Path, count: int) -> dict:
    image = blank_image(workdir / "dd.img")
    started = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={image}", "bs=4k", f"count={count}", "conv=notrunc"],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - started
    return {"bytes": count * PAGE_SIZE, "seconds": round(seconds, 4),
            "mb_s": round(count * PAGE_SIZE / seconds / 1e6, 1)}


def notify_exit(workdir: Path, seconds: float) -> dict:
    # mov ebx, QueueNotify; loop: inc rcx; mov [rbx], eax; jmp loop
    code = b"\xbb" + (MMIO_BASE + Reg.QUEUE_NOTIFY).to_bytes(4, "little") + b"\x48\xff\xc1" + b"\x89\x03" + b"\xeb\xf9"
    kernel = workdir / "notify-loop.elf"
    kernel.write_bytes(elf_image(code))
    config = VmConfig(kernel=kernel, mem_size=16 * MiB, serial_out=os.open(os.devnull, os.O_WRONLY),
                      disks=[DiskConfig(blank_image(workdir / "notify.img"))])
    with build_microvm_for_boot(config) as vm:
        started = time.perf_counter()
        vm.start()
        time.sleep(seconds)
        vm.pause()
        elapsed = time.perf_counter() - started
        exits = vm.vcpus[0].fd.get_regs().rcx
    return {"exits_per_s": round(exits / elapsed), "us_per_exit": round(elapsed / exits * 1e6, 1)}


def incremental_snapshot(elf: Path, workdir: Path, between_s: float) -> dict:
    image = blank_image(workdir / "snap.img")
    repo = Repository.open_url(str(workdir / "repo"), create=True)
    out = io.BytesIO()
    cmdline = f"{BASE_CMDLINE} tg.diskwrites=256 tg.rounds=0"
    vm = snapvisor.VM.boot(elf, mem="64M", cmdline=cmdline, serial_out=out, disks=[image])
    try:
        disk = attached_disks(vm.vm)["vda"]
        while len(DISK_ROUND.findall(out.getvalue())) < 3:
            time.sleep(0.01)
        vm.snapshot(repo)
        full = vm.last_snapshot
        written_at_first = disk.bytes_written
        time.sleep(between_s)
        vm.snapshot(repo)
        incremental = vm.last_snapshot
        written_between = disk.bytes_written - written_at_first
    finally:
        vm.stop()
        vm.close()
    stored = incremental.region_pages["disk-vda"] * PAGE_SIZE
    return {
        "disk_bytes": DISK_SIZE,
        "full_snapshot_disk_bytes": full.region_pages["disk-vda"] * PAGE_SIZE,
        "guest_wrote_between_bytes": written_between,
        "incremental_disk_bytes": stored,
        "stored_per_written": round(stored / written_between, 3),
        "incremental_disk_blocks": incremental.region_pages["disk-vda"],
        "incremental_memory_pages": sum(n for name, n in incremental.region_pages.items() if not name.startswith("disk-")),
        "incremental_bytes_written_to_repo": incremental.store["bytes_written"],
        "incremental_pause_ms": round(incremental.pause_s * 1000, 2),
    }


def lazy_restore(elf: Path, workdir: Path, runs: int) -> dict:
    image = workdir / "restore-source.img"
    with image.open("wb") as file:
        for _ in range(RESTORE_DISK_SIZE // (16 * MiB)):
            file.write(os.urandom(16 * MiB))
    repo = str(workdir / "restore-repo")
    out = io.BytesIO()
    vm = snapvisor.VM.boot(elf, mem="64M", cmdline="console=ttyS0 tg.mem=8 tg.rate=10 tg.pages=64 tg.rounds=0",
                           serial_out=out, disks=[image])
    try:
        while b"round=1 " not in out.getvalue():
            time.sleep(0.01)
        snapshot = vm.snapshot(repo)
    finally:
        vm.stop()
        vm.close()
    image.unlink()
    lazy_first, lazy_disk_in, eager = [], [], []
    for run in range(runs):
        for lazy in (True, False):
            disk_dir = workdir / f"restored-{run}-{lazy}"
            disk_dir.mkdir()
            started = time.perf_counter()
            vm = snapvisor.restore(repo, snapshot.id, lazy=lazy, serial_out=io.BytesIO(), disk_dir=disk_dir)
            if lazy:
                memory, disks = vm.lazy_memory, vm.lazy_disks
                while memory.first_fault_served_at is None and not memory.done:
                    time.sleep(0.0002)
                lazy_first.append((memory.first_fault_served_at or time.perf_counter()) - started)
                disks.wait()
                lazy_disk_in.append(time.perf_counter() - started)
                if disks.error is not None:
                    raise SystemExit(f"lazy disk restore failed: {disks.error}")
            else:
                eager.append(time.perf_counter() - started)
            vm.close()
            shutil.rmtree(disk_dir)
    median_ms = lambda xs: round(float(np.median(xs)) * 1e3, 1)  # noqa: E731
    return {
        "disk_bytes": RESTORE_DISK_SIZE,
        "runs": runs,
        "lazy_to_first_instruction_ms": median_ms(lazy_first),
        "eager_to_first_instruction_ms": median_ms(eager),
        "lazy_to_whole_disk_ms": median_ms(lazy_disk_in),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer writes (a smoke run)")
    args = parser.parse_args()
    elf = build()
    rounds, per_round = (2, 1024) if args.quick else (4, 4096)
    count = rounds * per_round
    with tempfile.TemporaryDirectory(prefix="snapvisor-bench-disk-") as tmp:
        workdir = Path(tmp)
        tool = workdir / "disk_pwrite"
        subprocess.run(["gcc", "-O2", "-o", str(tool), str(Path(__file__).with_name("disk_pwrite.c"))], check=True)
        result: dict = {"block_size": PAGE_SIZE, "disk_bytes": DISK_SIZE, "guest_vs_host": {}}
        for sequential in (True, False):
            guest = guest_writes(elf, workdir, sequential, rounds, per_round)
            host = host_pwrite(tool, workdir, sequential, count)
            entry = {"guest_virtio_blk": guest, "host_pwrite": host,
                     "guest_per_host": round(guest["mb_s"] / host["mb_s"], 4)}
            if sequential:
                entry["host_dd"] = host_dd(workdir, count)
            result["guest_vs_host"]["sequential_4k" if sequential else "random_4k"] = entry
        result["notify_exit"] = notify_exit(workdir, 1.0)
        result["notify_exit"]["share_of_a_guest_random_4k_write"] = round(
            result["notify_exit"]["us_per_exit"] / (1e6 / result["guest_vs_host"]["random_4k"]["guest_virtio_blk"]["iops"]), 3)
        result["incremental_snapshot"] = incremental_snapshot(elf, workdir, 0.5 if args.quick else 1.0)
        result["lazy_restore"] = lazy_restore(elf, workdir, 1 if args.quick else 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
