"""Restore: a new VM from any snapshot in a repository (no chain replay).

Before anything is built, the snapshot's compatibility record is checked against
this host. Guest RAM is then either read in full (eager) or registered for lazy
filling, each disk image is written in full (eager) or created empty and filled
behind the guest (lazy), and every vCPU, irqchip and device part is restored; the
VM is returned not yet started.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

from snapvisor.errors import SnapvisorError
from snapvisor.image.capture import STATE_BLOB
from snapvisor.image.compat import IncompatibleSnapshot, check_compat
from snapvisor.image.disks import attached_disks, create_image, region_name, release_frames, write_sparse_image
from snapvisor.image.lazy import LazyMemory
from snapvisor.image.lazydisk import LazyDisks
from snapvisor.image.state_codec import decode_state
from snapvisor.store import Repository, Snapshot
from snapvisor.vmm.builder import NetRestoreOptions, build_microvm_from_state, check_net_restore
from snapvisor.vmm.exit_status import ExitStatus
from snapvisor.vmm.kvm import Kvm, ffi
from snapvisor.vmm.memory import GuestMemory
from snapvisor.vmm.vm import Vm

LAZY_FAILURE_EXIT = 70


class RestoreError(SnapvisorError):
    """A snapshot could not be restored; nothing was started."""


@dataclass
class RestoredVm:
    vm: Vm
    snapshot: Snapshot
    lazy: LazyMemory | None
    lazy_disks: LazyDisks | None  # None also when the snapshot has no disks


def host_cpuid() -> bytes:
    """The CPUID entries KVM on this host can show a guest, as raw kvm_cpuid_entry2 bytes."""
    kvm = Kvm.open()
    try:
        table = kvm.get_supported_cpuid()
        return bytes(ffi.buffer(table.entries, table.nent * ffi.sizeof("struct kvm_cpuid_entry2")))
    finally:
        kvm.close()


def check_restorable(snapshot: Snapshot) -> dict:
    """The decoded VM state of `snapshot`, once it is known this host can run it."""
    name = snapshot.info.short_id
    record = snapshot.info.meta.get("compat")
    if not isinstance(record, dict):
        raise IncompatibleSnapshot(f"snapshot {name} has no compatibility record; it is not a VM snapshot")
    check_compat(record, host_cpuid(), name)
    state = decode_state(snapshot.get_blob(STATE_BLOB))
    try:
        layout = [(r["name"], int(r["size"])) for r in state["memory"]["regions"]]
    except (KeyError, TypeError, ValueError):
        raise RestoreError(f"snapshot {name}: the saved VM state has no readable memory layout") from None
    for region, size in layout:
        if snapshot.regions.get(region) != size:
            raise RestoreError(
                f"snapshot {name}: memory region {region} ({size} bytes) is missing or has another size in the "
                f"snapshot; it is damaged: run `snapvisor verify`"
            )
    return state


def _disk_image_paths(
    snapshot: Snapshot, state: dict, disk_dir: Path | str | None, disk_paths: Mapping[str, Path | str] | None
) -> dict[str, Path]:
    """Where each of the snapshot's disks is to be written."""
    name = snapshot.info.short_id
    disks = [disk["name"] for disk in state["config"].get("disks", [])]
    unknown = sorted(set(disk_paths or {}) - set(disks))
    if unknown:
        raise RestoreError(
            f"snapshot {name} has no disk {', '.join(unknown)} (its disks: {', '.join(disks) or 'none'})"
        )
    paths: dict[str, Path] = {}
    for disk in disks:
        if region_name(disk) not in snapshot.regions:
            raise RestoreError(f"snapshot {name}: disk {disk} is missing from the snapshot; it is damaged: run `snapvisor verify`")
        if disk_paths and disk in disk_paths:
            paths[disk] = Path(disk_paths[disk])
        elif disk_dir is not None:
            paths[disk] = Path(disk_dir) / f"{disk}.img"
        else:
            raise RestoreError(
                f"snapshot {name} has disks ({', '.join(disks)}): say where to write them "
                f"(disk_dir=, or --disk-dir DIR on the command line)"
            )
    return paths


def restore_vm(
    repo: Repository,
    snapshot_id: str,
    *,
    lazy: bool = False,
    serial_out: BinaryIO | int | None = None,
    serial_in: BinaryIO | int | None = None,
    disk_dir: Path | str | None = None,
    disk_paths: Mapping[str, Path | str] | None = None,
    net: NetRestoreOptions | None = None,
) -> RestoredVm:
    """Each disk of the snapshot is written as a new sparse image, to
    `disk_paths[name]` or else `disk_dir/<name>.img` (vda.img, ...), and attached;
    with `lazy`, the images are created empty and fill in behind the guest. Each
    network device attaches to its tap, or the one `net.taps` puts in its place."""
    snapshot = repo.get_snapshot(snapshot_id)
    state = check_restorable(snapshot)
    images = _disk_image_paths(snapshot, state, disk_dir, disk_paths)
    check_net_restore(state["config"], net)
    lazy_memory: list[LazyMemory] = []
    built: list[Vm] = []

    def stop_on_fetch_failure(what: str) -> Callable[[BaseException], None]:
        def stop(exc: BaseException) -> None:
            # The guest cannot go on without its memory or disks: stop it and say why.
            message = (f"lazy restore of snapshot {snapshot.info.short_id} could not fetch {what}: {exc}; "
                       f"the VM was stopped")
            if built:
                built[0].request_exit(ExitStatus(LAZY_FAILURE_EXIT, "error", message))

        return stop

    def fill(memory: GuestMemory) -> None:
        readers = [(region, snapshot.region_reader(region.name)) for region in memory.regions]
        if lazy:
            # Serve faults from here on: restoring vCPU state may already touch RAM.
            lazy_memory.append(LazyMemory(readers, on_error=stop_on_fetch_failure("guest memory")))
            # Devices (virtio rings and buffers) touch guest RAM from Python: fill it first.
            memory.before_access = lazy_memory[0].make_resident
            lazy_memory[0].start()
        else:
            for region, reader in readers:
                reader.read_into(region.view, threads=repo.threads)

    written: list[Path] = []
    lazy_disks: LazyDisks | None = None
    try:
        for name, path in images.items():
            reader = snapshot.region_reader(region_name(name))
            if lazy:
                os.close(create_image(path, reader.size))
            else:
                write_sparse_image(reader, path)
            written.append(path)
        built.append(build_microvm_from_state(
            state, serial_out=serial_out, serial_in=serial_in, memory_fill=fill, disk_paths=images, net=net
        ))
        if lazy_memory and lazy_memory[0].error is not None:
            # The fill failed while the VM was being built: no one was there to stop.
            raise RestoreError(f"lazy restore of snapshot {snapshot.info.short_id} could not fetch guest "
                               f"memory: {lazy_memory[0].error}")
        if lazy and images:
            attached = attached_disks(built[0])
            lazy_disks = LazyDisks(
                {name: (attached[name], snapshot.region_reader(region_name(name))) for name in images},
                on_error=stop_on_fetch_failure("disk blocks"),
            )
            lazy_disks.start(after=lazy_memory[0].wait)
    except BaseException as exc:
        release_frames(exc)  # views of guest RAM and images in a failed read's frames: they must unmap
        if lazy_disks is not None:
            lazy_disks.close()
        for memory in lazy_memory:  # before guest RAM goes: its fill threads write there
            memory.close()
        for vm in built:
            vm.close()
        for path in written:
            os.unlink(path)
        raise
    return RestoredVm(built[0], snapshot, lazy_memory[0] if lazy_memory else None, lazy_disks)
