"""Child process for the Linux snapshot test: restore a snapshot, run the kernel
until it stops, and write everything it printed to a file."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import snapvisor


def main(repo_url: str, snapshot_id: str, console_path: str, timeout: float) -> None:
    out = io.BytesIO()
    with snapvisor.restore(repo_url, snapshot_id, serial_out=out) as vm:
        status = vm.wait(timeout)
        Path(console_path).write_bytes(out.getvalue())
        print(f"STATUS {status.reason if status else 'timeout'}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
