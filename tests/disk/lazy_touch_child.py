"""Child process for test_disk_snapshot.py: restore a snapshot lazily and, before
its memory is all in, read guest RAM through GuestMemory the way a device does.
Prints the bytes read; hangs (and the parent's timeout fires) if the read faults
while holding the GIL. Arguments: REPO SNAPSHOT_ID DISK_DIR GPA [--no-hook]."""

from __future__ import annotations

import io
import sys

import snapvisor


def main() -> None:
    repo, snapshot_id, disk_dir, gpa = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4], 0)
    vm = snapvisor.restore(repo, snapshot_id, lazy=True, serial_out=io.BytesIO(), disk_dir=disk_dir, start=False)
    if "--no-hook" in sys.argv:
        vm.vm.memory.before_access = None
    assert not vm.lazy_memory.done, "the fill finished before the read: nothing was tested"
    print(vm.vm.memory.read(gpa, 16).hex(), flush=True)
    vm.close()


if __name__ == "__main__":
    main()
