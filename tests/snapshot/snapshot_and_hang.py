"""Child process for the crash test: boot the test guest, snapshot it, print the
snapshot id, and keep the VM running until killed."""

from __future__ import annotations

import io
import sys
import time

import snapvisor
from guest_console import wait_for_rounds


def main(repo_url: str, kernel: str) -> None:
    out = io.BytesIO()
    vm = snapvisor.VM.boot(kernel, mem="64M", cmdline="tg.mem=8 tg.rate=10 tg.pages=256 tg.rounds=0", serial_out=out)
    wait_for_rounds(out, 1, 2)
    vm.snapshot(repo_url)
    time.sleep(0.2)
    info = vm.snapshot(repo_url)
    print(f"SNAPSHOT {info.id}", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
