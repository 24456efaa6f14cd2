"""The Python API: boot a VM, snapshot it, restore it.

    import snapvisor
    vm = snapvisor.VM.boot("guest.elf", mem="256M", cmdline="tg.rounds=0")
    first = vm.snapshot("/srv/repo")               # full: every non-zero page
    later = vm.snapshot("/srv/repo", tags=["hourly"])  # incremental: dirtied pages only
    vm.stop()
    vm2 = snapvisor.restore("/srv/repo", later.id, lazy=True)
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import BinaryIO

from snapvisor.humanize import parse_size
from snapvisor.image.capture import CaptureStats, Snapshotter
from snapvisor.image.lazy import LazyMemory
from snapvisor.image.lazydisk import LazyDisks
from snapvisor.image.restore import restore_vm
from snapvisor.store import Repository, SnapshotInfo
from snapvisor.store.reader import Progress, reporting_progress
from snapvisor.vmm.builder import NetConfig, NetRestoreOptions, VmConfig, build_microvm_for_boot
from snapvisor.vmm.devices.blockfile import DiskConfig
from snapvisor.vmm.exit_status import ExitStatus
from snapvisor.vmm.vm import Vm

Repo = Repository | str


def _repository(repo: Repo, create: bool) -> Repository:
    return repo if isinstance(repo, Repository) else Repository.open_url(repo, create=create)


def _size(value: int | str) -> int:
    return value if isinstance(value, int) else parse_size(value)


class VM:
    """A running micro-VM that can be snapshotted while it runs."""

    def __init__(self, vm: Vm, name: str, lazy: LazyMemory | None = None, lazy_disks: LazyDisks | None = None) -> None:
        self.vm = vm
        self.name = name
        self._lazy = lazy
        self._lazy_disks = lazy_disks
        self._snapshotter = Snapshotter(vm, name)

    @classmethod
    def boot(
        cls,
        kernel: str | Path,
        *,
        mem: int | str = 256 << 20,
        vcpus: int = 1,
        cmdline: str = "console=ttyS0",
        initrd: str | Path | None = None,
        name: str | None = None,
        serial_out: BinaryIO | int | None = None,
        serial_in: BinaryIO | int | None = None,
        disks: list[str | Path | DiskConfig] = (),
        nets: list[NetConfig] = (),
    ) -> "VM":
        """`disks`: raw image files (paths, or DiskConfig for read-only ones),
        attached as virtio-blk vda, vdb, ... and captured with every snapshot;
        `nets`: virtio-net eth0, eth1, ... on host taps."""
        config = VmConfig(
            kernel=Path(kernel),
            initrd=Path(initrd) if initrd else None,
            cmdline=cmdline,
            mem_size=_size(mem),
            vcpus=vcpus,
            serial_out=serial_out,
            serial_in=serial_in,
            disks=[disk if isinstance(disk, DiskConfig) else DiskConfig(Path(disk)) for disk in disks],
            nets=list(nets),
        )
        vm = build_microvm_for_boot(config)
        machine = cls(vm, name or f"vm-{secrets.token_hex(3)}")
        vm.start()
        return machine

    def snapshot(self, repo: Repo, *, tags: tuple[str, ...] | list[str] = (), full: bool = False) -> SnapshotInfo:
        """Write a snapshot (incremental when this repository holds this VM's last
        one) while the VM keeps running; it pauses only to copy dirtied pages."""
        if self._lazy is not None:
            # Capture reads guest RAM from Python: all of it must be resident first.
            self._lazy.wait_complete()
        return self._snapshotter.snapshot(_repository(repo, create=True), tags=tags, full=full)

    @property
    def last_snapshot(self) -> CaptureStats | None:
        return self._snapshotter.last

    @property
    def lazy_memory(self) -> LazyMemory | None:
        return self._lazy

    @property
    def lazy_disks(self) -> LazyDisks | None:
        """The disks' fill after a lazy restore (`wait()`, `done`, `error`): full
        snapshots and migrations wait for it themselves, incremental snapshots need not."""
        return self._lazy_disks

    def pause(self) -> None:
        self.vm.pause()

    def resume(self) -> None:
        self.vm.resume()

    def wait(self, timeout: float | None = None) -> ExitStatus | None:
        return self.vm.wait(timeout)

    def stop(self) -> ExitStatus:
        return self.vm.stop()

    def moved_away(self, to: str) -> ExitStatus:
        """End the VM here once it runs at `to` (a migration's last step), with a
        status of its own (0, 'migrated') so that whoever waits on it tells a move
        from a power-off or a crash."""
        self.vm.request_exit(ExitStatus(0, "migrated", f"VM {self.name} moved to {to}, it runs there now"))
        return self.vm.stop()

    def close(self) -> None:
        self.vm.close()
        if self._lazy is not None:
            self._lazy.close()
        if self._lazy_disks is not None:
            self._lazy_disks.close()

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def restore(
    repo: Repo,
    snapshot_id: str,
    *,
    lazy: bool = False,
    name: str | None = None,
    serial_out: BinaryIO | int | None = None,
    serial_in: BinaryIO | int | None = None,
    start: bool = True,
    disk_dir: str | Path | None = None,
    disk_paths: dict[str, str | Path] | None = None,
    progress: Progress | None = None,
    net: NetRestoreOptions | None = None,
) -> VM:
    """A new VM from `snapshot_id` (an id or a unique prefix); with `lazy`, the
    guest starts before its memory and disks are read, and they stream in behind
    it (`lazy_memory`, `lazy_disks`). Its disks are new sparse images in
    `disk_dir` (vda.img, ...) or at `disk_paths[name]`, attached. `progress` (a
    humanize.Activity, say) hears of the bytes read before the VM is returned."""
    repository = _repository(repo, create=False)
    if progress is not None and not lazy:  # lazy reads nothing before the VM is returned
        total = sum(repository.get_snapshot(snapshot_id).regions.values())
        if total:  # else nothing to count: the caller's activity line says enough
            progress.start(total)
    with reporting_progress(progress):
        restored = restore_vm(
            repository, snapshot_id, lazy=lazy, serial_out=serial_out, serial_in=serial_in,
            disk_dir=disk_dir, disk_paths=disk_paths, net=net,
        )
    machine = VM(restored.vm, name or restored.snapshot.info.vm, restored.lazy, restored.lazy_disks)
    machine._snapshotter.adopt_parent(repository, restored.snapshot.id)
    if start:
        restored.vm.start()
    return machine
