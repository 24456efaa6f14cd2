"""VMM core benchmark: boot latency and the run loop's port-I/O exit rate.

    flock /tmp/snapvisor-bench.lock python3 bench/boot.py [--runs N] [--seconds S] [--output FILE]

Prints one JSON document:
- first_serial_byte_cli: wall time from launching `snapvisor run` (a fresh
  Python process) to the test guest's first byte on its stdout;
- first_serial_byte_in_process: build_microvm_for_boot() + start() to the first
  byte, inside one process (the VMM's own cost without interpreter start-up);
- pio_exits: exits per second of the guest loop `inc rbx; out 0x80, al; jmp`
  under snapvisor's run loop, next to bench/pio_loop.c doing the same KVM_RUN
  round trip in C (built here with gcc), the physical limit on this host; and
  the same loop writing COM1's scratch register (a device on the bus).
Medians over N runs. Run it under the lock above, as the other benchmarks, so
that benchmarks on this shared machine do not overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "vmm"))  # the hand-assembled guest helper

from flat_guest import elf_image  # noqa: E402
from snapvisor.testguest import build  # noqa: E402
from snapvisor.vmm.builder import VmConfig, build_microvm_for_boot  # noqa: E402

GUEST_CMDLINE = "console=ttyS0 tg.mem=1 tg.rounds=1"
PIO_LOOP_CODE = b"\x48\xff\xc3" + b"\xe6\x80" + b"\xeb\xf9"  # inc rbx; out 0x80, al; jmp loop (unclaimed port)
# The same loop writing COM1's scratch register: each exit also goes through a device.
SERIAL_LOOP_CODE = b"\x66\xba\xff\x03" + b"\x48\xff\xc3" + b"\xee" + b"\xeb\xfa"  # mov dx,0x3ff; inc rbx; out dx,al


def first_byte_cli(kernel: Path) -> float:
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "snapvisor", "run", "--kernel", str(kernel), "--mem", "64M", "--cmdline", GUEST_CMDLINE],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
    )
    first = process.stdout.read(1)
    elapsed = time.perf_counter() - started
    process.stdout.read()
    if process.wait() != 0 or not first:
        raise RuntimeError("snapvisor run failed during the benchmark")
    return elapsed


def first_byte_in_process(kernel: Path) -> float:
    read_end, write_end = os.pipe()
    try:
        started = time.perf_counter()
        vm = build_microvm_for_boot(VmConfig(kernel=kernel, cmdline=GUEST_CMDLINE, mem_size=64 << 20, serial_out=write_end))
        with vm:
            vm.start()
            first = os.read(read_end, 1)
            elapsed = time.perf_counter() - started
            vm.stop()
    finally:
        os.close(read_end)
        os.close(write_end)
    if not first:
        raise RuntimeError("the guest printed nothing")
    return elapsed


def pio_exits_python(kernel: Path, seconds: float) -> float:
    vm = build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=16 << 20, serial_out=os.open(os.devnull, os.O_WRONLY)))
    with vm:
        started = time.perf_counter()
        vm.start()
        time.sleep(seconds)
        vm.pause()
        elapsed = time.perf_counter() - started
        iterations = vm.vcpus[0].fd.get_regs().rbx  # one exit per loop iteration
    return iterations / elapsed


def pio_exits_c(binary: Path, seconds: float) -> float:
    output = subprocess.run([str(binary), str(seconds)], capture_output=True, text=True, check=True).stdout
    return json.loads(output)["exits_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="repetitions per measurement (median reported)")
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each PIO-loop run")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        testguest = build()
        loop_guest = Path(work) / "pio_loop.elf"
        loop_guest.write_bytes(elf_image(PIO_LOOP_CODE))
        serial_guest = Path(work) / "serial_loop.elf"
        serial_guest.write_bytes(elf_image(SERIAL_LOOP_CODE))
        c_loop = Path(work) / "pio_loop"
        subprocess.run(["gcc", "-O2", "-o", str(c_loop), str(REPO / "bench" / "pio_loop.c")], check=True)

        cli = [first_byte_cli(testguest) for _ in range(args.runs)]
        in_process = [first_byte_in_process(testguest) for _ in range(args.runs)]
        # Alternate the two loops so that load from other users of the host
        # hits both alike; the per-pair ratio is the comparable figure.
        python_rate, c_rate = [], []
        for _ in range(max(3, args.runs // 2)):
            python_rate.append(pio_exits_python(loop_guest, args.seconds))
            c_rate.append(pio_exits_c(c_loop, args.seconds))
        serial_rate = [pio_exits_python(serial_guest, args.seconds) for _ in range(max(3, args.runs // 2))]
        load = os.getloadavg()

    result = {
        "benchmark": "boot",
        "host": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m_at_end": load[0],
        },
        "first_serial_byte_cli_s": {"median": statistics.median(cli), "runs": cli},
        "first_serial_byte_in_process_s": {"median": statistics.median(in_process), "runs": in_process},
        "pio_exits_per_second": {
            "snapvisor_python": statistics.median(python_rate),
            "c_loop": statistics.median(c_rate),
            "python_over_c_median_of_pairs": statistics.median(p / c for p, c in zip(python_rate, c_rate)),
            "snapvisor_python_through_serial_device": statistics.median(serial_rate),
            "runs_python": python_rate,
            "runs_c": c_rate,
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
