"""Verbs that run a VM: `run`, `restore`, and `snapshot` (asks a running one)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from snapvisor.cli.common import (
    EXIT_CODES_HELP,
    HelpFormatter,
    add_json_flag,
    add_operation_flags,
    add_repo_flag,
    disk_option,
    env_repos,
    memory_size,
    open_repo,
    operated,
    positive_int,
    print_json,
    repo_url,
    run_to_exit,
    subcommand,
    terminal_input,
)
from snapvisor.cli.net import NET_HELP, add_net_restore_flags, net_option, net_restore_options


@subcommand
def _add_run(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "run",
        help="boot a kernel in a new micro-VM",
        description=(
            "Boot a kernel in a new micro-VM on /dev/kvm. The guest's COM1 serial console is "
            "this terminal (input too, when stdin is a terminal). snapvisor exits when the guest "
            "powers off, with the status byte the guest wrote to port 0x501 (0 after a reset), or "
            "with 0 when the VM moved to another host (`snapvisor migrate --api-sock`)."
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--kernel",
        required=True,
        type=Path,
        metavar="PATH",
        help="kernel to boot: an ELF64 image (a vmlinux, the snapvisor test guest) or a Linux bzImage",
    )
    parser.add_argument("--initrd", type=Path, metavar="PATH", help="initial ramdisk to load for the kernel")
    parser.add_argument(
        "--cmdline",
        default="console=ttyS0",
        metavar="STR",
        help="kernel command line (default: %(default)s); for early Linux output add earlyprintk=serial",
    )
    parser.add_argument(
        "--mem",
        type=memory_size,
        default=256 << 20,
        metavar="SIZE",
        help="guest RAM, e.g. 256M or 1G; a bare number means MiB (default: 256M)",
    )
    parser.add_argument(
        "--vcpus",
        type=positive_int,
        default=1,
        metavar="N",
        help="number of virtual CPUs (default: 1; at most what KVM_CAP_NR_VCPUS reports)",
    )
    parser.add_argument(
        "--disk",
        type=disk_option,
        action="append",
        default=[],
        metavar="PATH[,readonly]",
        help="attach a raw disk image as virtio-blk (vda, vdb, ... in order; repeatable); "
        "snapshots capture it with memory",
    )
    parser.add_argument("--net", type=net_option, action="append", default=[], metavar="tap=NAME[,mac=MAC][,create]",
                        help=NET_HELP)
    add_operation_flags(parser, restoring=False)
    parser.set_defaults(handler=_run)



def _run(args: argparse.Namespace) -> int:
    from snapvisor.vmm.builder import VmConfig, build_microvm_for_boot

    stdin_fd = sys.stdin.fileno() if sys.stdin is not None else -1
    with terminal_input(stdin_fd) as serial_in:
        config = VmConfig(
            kernel=args.kernel,
            initrd=args.initrd,
            cmdline=args.cmdline,
            mem_size=args.mem,
            vcpus=args.vcpus,
            serial_out=sys.stdout.fileno(),
            serial_in=serial_in,
            disks=args.disk,
            nets=args.net,
        )
        with build_microvm_for_boot(config) as vm, operated(vm, args, args.repo or env_repos()) as controller:
            vm.start()
            return run_to_exit(vm, controller)




@subcommand
def _add_snapshot(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "snapshot", help="snapshot a running VM through its API socket",
        description="Ask a VM started with --api-sock to snapshot itself into a repository while "
                    "it runs (it pauses only to copy what changed). The first snapshot of a VM in "
                    "a repository holds every non-zero page; later ones the pages dirtied since.",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    parser.add_argument("--api-sock", type=Path, required=True, metavar="PATH", help="the VM's API socket")
    add_repo_flag(parser, password=False)  # the VMM holds the password
    parser.add_argument("--full", action="store_true", help="read and hash every page, not only those dirtied since the last snapshot "
                             "(pages the repository holds are still not stored again)")
    parser.add_argument("--tag", action="append", default=[], metavar="TAG", help="tag the snapshot (repeatable)")
    add_json_flag(parser)
    parser.set_defaults(handler=_snapshot)


def _snapshot(args: argparse.Namespace) -> int:
    from snapvisor import humanize
    from snapvisor.control import ApiClient

    url = repo_url(args)
    with humanize.Activity(f"snapshot into {url}"):
        answer = ApiClient(args.api_sock).snapshot(url, full=args.full, tags=args.tag)
    if args.json:
        print_json(answer)
        return 0
    store = answer.get("store", {})
    print(f"snapshot {answer['id'][:12]} of {answer['vm']} ({'full' if answer.get('full') else 'incremental'}) "
          f"in {url}: {humanize.size(store.get('bytes_written', 0))} written, "
          f"guest paused {humanize.duration(answer.get('pause_s', 0))}, took {humanize.duration(answer.get('total_s', 0))}"
          + (f" (coalesced: it answered {answer['requests']} requests that arrived while another snapshot ran)"
             if answer.get("coalesced") else ""))
    return 0


@subcommand
def _add_restore(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "restore", help="start a VM from a snapshot, console on this terminal",
        description="Start a new VM from a snapshot (any snapshot: none depends on another) and run "
                    "it in the foreground like `run`, its console on this terminal. The guest "
                    "continues from the instant of the snapshot. With --snapshot-every it is "
                    "snapshotted again into the same repository, incrementally.",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    add_repo_flag(parser)
    parser.add_argument("snapshot_id", metavar="ID", help="snapshot id or a unique prefix (see `snapvisor ls`)")
    parser.add_argument("--lazy", action="store_true",
                        help="start the guest at once and stream its memory and disks in behind it")
    parser.add_argument("--disk-dir", type=Path, metavar="DIR",
                        help="write the snapshot's disks here as sparse images (vda.img, ...) and attach them; "
                             "needed when the snapshot has disks")
    add_net_restore_flags(parser)
    add_operation_flags(parser, restoring=True)
    parser.set_defaults(handler=_restore)


def _restore(args: argparse.Namespace) -> int:
    from snapvisor import humanize
    from snapvisor.machine import restore

    url = repo_url(args)
    stdin_fd = sys.stdin.fileno() if sys.stdin is not None else -1
    with terminal_input(stdin_fd) as serial_in:
        with humanize.Activity(f"restoring {args.snapshot_id} from {url}") as activity:
            machine = restore(open_repo(args), args.snapshot_id, lazy=args.lazy, name=args.name,
                              serial_out=sys.stdout.fileno(), serial_in=serial_in, start=False,
                              disk_dir=args.disk_dir, progress=activity, net=net_restore_options(args))
        with machine, operated(machine, args, [url]) as controller:
            machine.vm.start()
            return run_to_exit(machine, controller)
