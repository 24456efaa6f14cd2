"""The `snapvisor` command: a thin argparse front end. All behaviour lives in
the packages below; each subcommand is one function that declares its
arguments and a handler (`@subcommand`), so adding a verb touches nothing else.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import termios
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from snapvisor import __version__
from snapvisor.errors import SnapvisorError

Handler = Callable[[argparse.Namespace], int]
_SUBCOMMANDS: list[Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]] = []


def subcommand(add: Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]):
    """Register a function that adds one subparser and sets `handler` on it."""
    _SUBCOMMANDS.append(add)
    return add


_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 20, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(text: str) -> int:
    """'256M', '1G', '512MiB', '4096K'; a bare number means MiB."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (examples: 256M, 1G, 512MiB)")
    return int(match.group(1)) << _UNITS[match.group(2).upper()]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be at least 1")
    return value


@contextmanager
def _terminal_input(fd: int) -> Iterator[int | None]:
    """Serial input from an interactive terminal: characters go to the guest as
    typed (no line editing, no local echo; the guest echoes). Ctrl-C still stops
    the VMM. Yields None when stdin is not a terminal."""
    if fd < 0 or not os.isatty(fd):
        yield None
        return
    saved = termios.tcgetattr(fd)
    raw = termios.tcgetattr(fd)
    raw[3] &= ~(termios.ICANON | termios.ECHO)  # lflags
    raw[6][termios.VMIN] = 1
    raw[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, raw)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@subcommand
def _add_run(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "run",
        help="boot a kernel in a new micro-VM",
        description=(
            "Boot a kernel in a new micro-VM on /dev/kvm. The guest's COM1 serial console is "
            "this terminal (input too, when stdin is a terminal). snapvisor exits when the guest "
            "powers off, with the status byte the guest wrote to port 0x501 (0 after a reset)."
        ),
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
        type=parse_size,
        default=256 << 20,
        metavar="SIZE",
        help="guest RAM, e.g. 256M or 1G; a bare number means MiB (default: 256M)",
    )
    parser.add_argument(
        "--vcpus",
        type=_positive_int,
        default=1,
        metavar="N",
        help="number of virtual CPUs (default: 1; at most what KVM_CAP_NR_VCPUS reports)",
    )
    parser.add_argument(
        "--disk",
        type=_disk_option,
        action="append",
        default=[],
        metavar="PATH[,readonly]",
        help="attach a raw disk image as virtio-blk (vda, vdb, ... in order; repeatable); "
        "snapshots capture it with memory",
    )
    _add_operation_flags(parser, restoring=False)
    parser.set_defaults(handler=_run)


def _disk_option(value: str):
    from snapvisor.vmm.devices.blockfile import DiskConfig

    path, _, option = value.rpartition(",")
    if option == "readonly" and path:
        return DiskConfig(Path(path), readonly=True)
    if path and not Path(value).exists():
        raise argparse.ArgumentTypeError(f"unknown disk option {option!r} in {value!r}: use PATH or PATH,readonly")
    return DiskConfig(Path(value))


def _run(args: argparse.Namespace) -> int:
    from snapvisor.vmm.builder import VmConfig, build_microvm_for_boot

    stdin_fd = sys.stdin.fileno() if sys.stdin is not None else -1
    with _terminal_input(stdin_fd) as serial_in:
        config = VmConfig(
            kernel=args.kernel,
            initrd=args.initrd,
            cmdline=args.cmdline,
            mem_size=args.mem,
            vcpus=args.vcpus,
            serial_out=sys.stdout.fileno(),
            serial_in=serial_in,
            disks=args.disk,
        )
        with build_microvm_for_boot(config) as vm, _operated(vm, args, args.repo or _env_repos()):
            vm.start()
            try:
                status = vm.wait()
            except KeyboardInterrupt:
                vm.stop()
                print("\nsnapvisor: interrupted, VM stopped", file=sys.stderr)
                return 130
    assert status is not None
    if status.reason == "error":
        print(f"error: {status.message}", file=sys.stderr)
    elif status.reason == "reset":
        print(f"snapvisor: {status.message}", file=sys.stderr)
    return status.code


# --- operating snapvisor: control API, schedules, repository verbs ---------------------

EXIT_CODES_HELP = """exit status:
  0    success
  1    the operation failed (the message says what and how to fix it)
  2    bad arguments
  3    verify found damage in the repository
  4    no VM answers on the API socket
  130  interrupted (Ctrl-C)
  run and restore exit with the guest's power-off status (70: the VMM failed)

environment:
  SNAPVISOR_REPO      repository URL when --repo is not given (a path, file:///path, s3://bucket/prefix)
  AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...
                      S3 endpoint and credentials, read the boto3 way
"""

EXIT_DAMAGED = 3


class HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions to the terminal; keeps the exit status table as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text is EXIT_CODES_HELP:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class UsageError(SnapvisorError):
    """Arguments that argparse cannot check alone (they depend on each other or
    on the environment)."""

    exit_code = 2


_KEEP_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def _keep_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < -1:
        raise argparse.ArgumentTypeError(f"'{text}' must be -1 (no limit) or more")
    return value


def _duration(text: str) -> float:
    from snapvisor.humanize import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document for scripts instead of text")


def _add_repo_flag(parser: argparse.ArgumentParser, action: str = "store", text: str = "the repository") -> None:
    parser.add_argument(
        "--repo", action=action, metavar="URL",
        help=f"{text}: a directory, file:///path or s3://bucket/prefix (default: $SNAPVISOR_REPO)",
    )


def _add_keep_flags(parser: argparse.ArgumentParser, when: str) -> None:
    group = parser.add_argument_group(
        "retention", f"which snapshots of each VM to keep {when}; the others are forgotten "
        "(their data goes with `snapvisor gc`). Bucket rules keep the newest snapshot of each of "
        "the N most recent hours/days/...; -1 means no limit; rules add up.")
    for rule in _KEEP_RULES:
        group.add_argument(f"--keep-{rule}", type=_keep_count, default=0, metavar="N",
                           help=f"keep the {'N newest snapshots' if rule == 'last' else 'newest snapshot of the last N ' + rule[:-2].replace('dai', 'day') + 's'}")
    group.add_argument("--keep-within", type=_duration, metavar="DURATION",
                       help="keep every snapshot younger than DURATION before the newest (e.g. 2d)")


def _keep_policy(args: argparse.Namespace):
    from datetime import timedelta

    from snapvisor.store import KeepPolicy

    within = timedelta(seconds=args.keep_within) if args.keep_within else None
    policy = KeepPolicy(**{rule: getattr(args, f"keep_{rule}") for rule in _KEEP_RULES}, within=within)
    return None if policy.is_empty() else policy


def _repo_url(args: argparse.Namespace) -> str:
    url = args.repo or os.environ.get("SNAPVISOR_REPO")
    if not url:
        raise UsageError("no repository: give --repo URL or set SNAPVISOR_REPO")
    return _absolute_repo(url)


def _absolute_repo(url: str) -> str:
    # The VMM may run in another directory: send it paths it resolves the same way.
    return url if "://" in url else os.path.abspath(url)


def _open_repo(args: argparse.Namespace):
    from snapvisor.store import Repository

    return Repository.open_url(_repo_url(args))


def _print_json(value: object) -> None:
    import json

    print(json.dumps(value, indent=2, default=str))


def _add_operation_flags(parser: argparse.ArgumentParser, restoring: bool) -> None:
    """The flags that make a VM operable: API socket, name, schedule, retention."""
    group = parser.add_argument_group("operation")
    group.add_argument("--api-sock", type=Path, metavar="PATH",
                       help="serve the control API (HTTP/JSON) on this Unix socket, owner-only; "
                            "`snapvisor snapshot --api-sock PATH` and curl --unix-socket talk to it")
    group.add_argument("--name", metavar="NAME",
                       help="the VM's name in snapshots; retention applies per name "
                            + ("(default: the snapshot's)" if restoring else "(default: vm-<random>)"))
    group.add_argument("--snapshot-every", type=_duration, metavar="DURATION",
                       help="snapshot the running guest every DURATION (30s, 15m, 1h) into "
                            + ("the repository it was restored from" if restoring else "each --repo")
                            + "; failed attempts retry with back-off and lose no dirty page")
    if not restoring:
        _add_repo_flag(parser, action="append", text="repository for scheduled snapshots (repeat for several)")
    _add_keep_flags(parser, "after each scheduled snapshot")


def _schedule_from_args(args: argparse.Namespace, repos: list[str]):
    from snapvisor.control import Schedule

    policy = _keep_policy(args)
    if args.snapshot_every is None:
        if policy is not None:
            raise UsageError("--keep-* applies after scheduled snapshots: add --snapshot-every")
        return None
    if not repos:
        raise UsageError("--snapshot-every needs a repository: give --repo URL or set SNAPVISOR_REPO")
    return Schedule(args.snapshot_every, tuple(_absolute_repo(r) for r in repos), keep=policy)


def _env_repos() -> list[str]:
    return [os.environ["SNAPVISOR_REPO"]] if os.environ.get("SNAPVISOR_REPO") else []


def _log_to_stderr(line: str) -> None:
    print(f"snapvisor: {line}", file=sys.stderr, flush=True)


@contextmanager
def _operated(vm, args: argparse.Namespace, repos: list[str]) -> Iterator[None]:
    """The control API and schedule around a VM, when asked for; `vm` is a
    vmm Vm (from `run`) or an already wrapped machine.VM (from `restore`)."""
    from snapvisor.machine import VM

    schedule = _schedule_from_args(args, repos)
    if isinstance(vm, VM):
        machine = vm
    elif args.api_sock is None and schedule is None:
        yield  # no snapshots possible: no dirty log to keep
        return
    else:
        machine = VM(vm, args.name or f"vm-{os.urandom(3).hex()}")
    from snapvisor.control import serve

    with serve(machine, api_sock=args.api_sock, schedule=schedule, log=_log_to_stderr):
        yield


def _finish(status) -> int:
    if status.reason == "error":
        print(f"error: {status.message}", file=sys.stderr)
    elif status.reason == "reset":
        print(f"snapvisor: {status.message}", file=sys.stderr)
    return status.code


@subcommand
def _add_snapshot(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "snapshot", help="snapshot a running VM through its API socket",
        description="Ask a VM started with --api-sock to snapshot itself into a repository while "
                    "it runs (it pauses only to copy what changed). The first snapshot of a VM in "
                    "a repository holds every non-zero page; later ones the pages dirtied since.",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    parser.add_argument("--api-sock", type=Path, required=True, metavar="PATH", help="the VM's API socket")
    _add_repo_flag(parser)
    parser.add_argument("--full", action="store_true", help="store every page, not only those dirtied since the last snapshot")
    parser.add_argument("--tag", action="append", default=[], metavar="TAG", help="tag the snapshot (repeatable)")
    _add_json_flag(parser)
    parser.set_defaults(handler=_snapshot)


def _snapshot(args: argparse.Namespace) -> int:
    from snapvisor import humanize
    from snapvisor.control import ApiClient

    url = _repo_url(args)
    with humanize.Activity(f"snapshot into {url}"):
        answer = ApiClient(args.api_sock).snapshot(url, full=args.full, tags=args.tag)
    if args.json:
        _print_json(answer)
        return 0
    store = answer.get("store", {})
    print(f"snapshot {answer['id'][:12]} of {answer['vm']} ({'full' if answer.get('full') else 'incremental'}) "
          f"in {url}: {humanize.size(store.get('bytes_written', 0))} written, "
          f"guest paused {humanize.duration(answer.get('pause_s', 0))}, took {humanize.duration(answer.get('total_s', 0))}")
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
    _add_repo_flag(parser)
    parser.add_argument("snapshot_id", metavar="ID", help="snapshot id or a unique prefix (see `snapvisor ls`)")
    parser.add_argument("--lazy", action="store_true",
                        help="start the guest at once and stream its memory in behind it (userfaultfd)")
    parser.add_argument("--disk-dir", type=Path, metavar="DIR",
                        help="write the snapshot's disks here as sparse images (vda.img, ...) and attach them; "
                             "needed when the snapshot has disks")
    _add_operation_flags(parser, restoring=True)
    parser.set_defaults(handler=_restore)


def _restore(args: argparse.Namespace) -> int:
    from snapvisor import humanize
    from snapvisor.machine import restore

    url = _repo_url(args)
    stdin_fd = sys.stdin.fileno() if sys.stdin is not None else -1
    with _terminal_input(stdin_fd) as serial_in:
        with humanize.Activity(f"restoring {args.snapshot_id} from {url}"):
            machine = restore(url, args.snapshot_id, lazy=args.lazy, name=args.name,
                              serial_out=sys.stdout.fileno(), serial_in=serial_in, start=False,
                              disk_dir=args.disk_dir)
        with machine, _operated(machine, args, [url]):
            machine.vm.start()
            try:
                status = machine.wait()
            except KeyboardInterrupt:
                machine.stop()
                print("\nsnapvisor: interrupted, VM stopped", file=sys.stderr)
                return 130
    assert status is not None
    return _finish(status)


@subcommand
def _add_ls(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "ls", help="list the snapshots in a repository",
        description="List a repository's snapshots, oldest first: id, time (UTC), age, VM, kind, "
                    "memory size and tags.",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    _add_repo_flag(parser)
    parser.add_argument("--vm", metavar="NAME", help="only this VM's snapshots")
    parser.add_argument("--tag", metavar="TAG", help="only snapshots with this tag")
    _add_json_flag(parser)
    parser.set_defaults(handler=_ls)


def _ls(args: argparse.Namespace) -> int:
    from snapvisor import humanize
    from snapvisor.control.controller import snapshot_json

    with _open_repo(args) as repo:
        snapshots = [s for s in repo.list_snapshots()
                     if (args.vm is None or s.vm == args.vm) and (args.tag is None or args.tag in s.tags)]
    if args.json:
        _print_json([snapshot_json(s) for s in snapshots])
        return 0
    rows = [("ID", "TIME", "AGE", "VM", "KIND", "MEMORY", "TAGS")]
    rows += [(s.short_id, humanize.timestamp(s.time), humanize.age(s.time), s.vm, str(s.meta.get("kind", "-")),
              humanize.size(sum(s.regions.values())), ",".join(s.tags)) for s in snapshots]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"{len(snapshots)} snapshot{'s' if len(snapshots) != 1 else ''}")
    return 0


@subcommand
def _add_show(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "show", help="details of one snapshot",
        description="Show one snapshot: time, VM, kind, parent, tags, memory regions, stored "
                    "blobs and the compatibility record (what a host needs to restore it).",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    _add_repo_flag(parser)
    parser.add_argument("snapshot_id", metavar="ID", help="snapshot id or a unique prefix")
    _add_json_flag(parser)
    parser.set_defaults(handler=_show)


def _show(args: argparse.Namespace) -> int:
    from snapvisor import humanize

    with _open_repo(args) as repo:
        info = repo.get_snapshot(args.snapshot_id).info
    if args.json:
        _print_json({"id": info.id, "time": info.time.isoformat(), "vm": info.vm, "tags": info.tags,
                     "parent": info.parent, "regions": info.regions, "blobs": info.blobs, "meta": info.meta})
        return 0
    compat = info.meta.get("compat") if isinstance(info.meta.get("compat"), dict) else {}
    lines = [
        ("snapshot", info.id),
        ("time", f"{humanize.timestamp(info.time)} ({humanize.age(info.time)})"),
        ("vm", info.vm),
        ("kind", str(info.meta.get("kind", "-"))),
        ("parent", info.parent or "-"),
        ("tags", ", ".join(info.tags) or "-"),
        ("memory", ", ".join(f"{name} {humanize.size(size)}" for name, size in sorted(info.regions.items()))),
        ("blobs", ", ".join(info.blobs) or "-"),
    ]
    lines += [(f"compat.{key}", str(value)) for key, value in sorted(compat.items())
              if isinstance(value, (str, int, float))]
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")
    return 0


@subcommand
def _add_verify(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "verify", help="check a repository's integrity",
        description="Check that every snapshot's manifest, page maps and index entries are there "
                    "and consistent. With --read-data also read, decompress and hash every stored "
                    "page (slow: reads the whole repository). Exits 3 when anything is damaged.",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    _add_repo_flag(parser)
    parser.add_argument("--read-data", action="store_true", help="also read and check every stored byte")
    _add_json_flag(parser)
    parser.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace) -> int:
    from snapvisor import humanize

    with _open_repo(args) as repo, humanize.Activity(f"verifying {repo.store.url}"):
        report = repo.verify(read_data=args.read_data)
    if args.json:
        _print_json({"ok": report.ok, "errors": report.errors, "counts": report.counts})
    else:
        counts = report.counts
        print(f"{counts.get('snapshots', 0)} snapshots, {counts.get('packs', 0)} packs, "
              f"{counts.get('objects_referenced', 0)} referenced objects"
              + (f", {humanize.size(counts.get('bytes_read', 0))} read and checked" if args.read_data else ""))
        for error in report.errors:
            print(f"damaged: {error}")
        print("repository OK" if report.ok else f"{len(report.errors)} problem(s) found")
    return 0 if report.ok else EXIT_DAMAGED


@subcommand
def _add_prune(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "prune", help="forget snapshots that the keep rules do not retain",
        description="Apply keep rules to each VM's snapshots (each VM on its own) and forget the "
                    "rest. Any remaining snapshot stays restorable: none depends on another. The "
                    "space is reclaimed by `snapvisor gc`.",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    _add_repo_flag(parser)
    _add_keep_flags(parser, "")
    parser.add_argument("--vm", metavar="NAME", help="only judge this VM's snapshots")
    parser.add_argument("--dry-run", action="store_true", help="show what would be forgotten, forget nothing")
    _add_json_flag(parser)
    parser.set_defaults(handler=_prune)


def _prune(args: argparse.Namespace) -> int:
    from snapvisor import humanize

    policy = _keep_policy(args)
    if policy is None:
        raise UsageError("prune needs at least one --keep-* rule (e.g. --keep-last 3); without one "
                         "it would forget every snapshot")
    with _open_repo(args) as repo:
        result = repo.prune(policy, dry_run=args.dry_run, vm=args.vm)
    if args.json:
        _print_json({"dry_run": result.dry_run, "keep": [s.id for s in result.keep],
                     "remove": [s.id for s in result.remove], "reasons": result.reasons})
        return 0
    for snap in sorted(result.keep + result.remove, key=lambda s: (s.vm, s.time)):
        reasons = result.reasons.get(snap.id)
        verdict = f"keep    ({', '.join(reasons)})" if reasons else ("would forget" if args.dry_run else "forgot")
        print(f"{snap.short_id}  {humanize.timestamp(snap.time)}  {snap.vm}  {verdict}")
    print(f"{len(result.keep)} kept, {len(result.remove)} {'to forget (dry run)' if args.dry_run else 'forgotten'}"
          + ("; run `snapvisor gc` to reclaim their space" if result.remove and not args.dry_run else ""))
    return 0


@subcommand
def _add_gc(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "gc", help="delete data no snapshot uses",
        description="Delete the packs and index entries that no remaining snapshot references "
                    "(after prune). Takes the repository's exclusive lock: snapshots into it wait.",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    _add_repo_flag(parser)
    parser.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    _add_json_flag(parser)
    parser.set_defaults(handler=_gc)


def _gc(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from snapvisor import humanize

    with _open_repo(args) as repo, humanize.Activity(f"collecting garbage in {repo.store.url}"):
        result = repo.gc(dry_run=args.dry_run)
    if args.json:
        _print_json(asdict(result))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{result.snapshots} snapshots use {result.packs_kept} packs; {verb} {result.packs_deleted} packs "
          f"({humanize.size(result.bytes_deleted)}); {humanize.size(result.unused_bytes_kept)} unused inside kept packs")
    return 0


# --- moving a VM to another host ------------------------------------------------------


def _add_migration_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("migration")
    group.add_argument("--timeout", type=_duration, default=20.0, metavar="DURATION",
                       help="treat the connection as cut after this long without progress (default: 20s)")
    _add_json_flag(parser)


@subcommand
def _add_receive(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "receive", help="wait for a VM migrating in, then run it here",
        description="Listen for one live migration (`snapvisor migrate --to` on the source host), "
                    "then run the arrived VM in the foreground like `run`, its console on this "
                    "terminal. Pages the source's newest snapshot shares are read from --repo when "
                    "both hosts can read it. Nothing runs here unless the migration completes.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, metavar="ADDR:PORT",
                        help="address to accept the migration on, e.g. 192.0.2.2:7000 or [2001:db8::2]:7000")
    parser.add_argument("--wait", type=_duration, metavar="DURATION",
                        help="give up when no migration arrives within DURATION (default: wait forever)")
    parser.add_argument("--disk-dir", type=Path, metavar="DIR",
                        help="write the VM's disks here as new sparse images (vda.img, ...) and attach them; "
                             "needed when the VM has disks")
    _add_migration_flags(parser)
    _add_operation_flags(parser, restoring=False)
    parser.set_defaults(handler=_receive)


def _receive(args: argparse.Namespace) -> int:
    import json

    from snapvisor.migrate import listen, receive

    listener = listen(args.listen)
    _log_to_stderr(f"waiting for a migration on {args.listen}")
    repos = [_absolute_repo(r) for r in args.repo or _env_repos()]
    received = receive(listener, repos=repos, serial_out=sys.stdout.fileno(), accept_timeout_s=args.wait,
                       io_timeout_s=args.timeout,
                       on_connect=lambda peer: _log_to_stderr(f"migration from {peer} started"),
                       disk_dir=args.disk_dir, name=args.name)
    machine = received.machine
    report = {"vm": machine.name, "downtime_s": received.downtime_s, "build_s": received.build_s,
              "pages": received.pages, "bytes_received": received.bytes_received}
    _log_to_stderr(json.dumps(report) if args.json else
                   f"VM {machine.name} migrated in and resumed; downtime {received.downtime_s * 1000:.1f} ms")
    with machine, _operated(machine, args, repos):
        try:
            status = machine.wait()
        except KeyboardInterrupt:
            machine.stop()
            print("\nsnapvisor: interrupted, VM stopped", file=sys.stderr)
            return 130
    assert status is not None
    return _finish(status)


@subcommand
def _add_migrate(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "migrate", help="boot a VM here and live-migrate it to another host",
        description="Boot a kernel as `run` does, run it for --after, then move it while it runs "
                    "to `snapvisor receive` on another host (pre-copy: memory is sent while the "
                    "guest runs, then the guest pauses for the last pages and its state). On success "
                    "the VM runs there and this command exits 0; on failure the VM keeps running "
                    "here, the error says why, and this command serves it until it powers off.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", required=True, metavar="ADDR:PORT", help="the receiving host's --listen address")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--after", type=_duration, metavar="DURATION",
                      help="let the guest run this long before migrating (default: at once)")
    when.add_argument("--on-signal", action="store_true",
                      help="migrate when this process receives SIGUSR1 (kill -USR1 PID)")
    parser.add_argument("--kernel", required=True, type=Path, metavar="PATH", help="kernel to boot (as for run)")
    parser.add_argument("--initrd", type=Path, metavar="PATH", help="initial ramdisk to load for the kernel")
    parser.add_argument("--cmdline", default="console=ttyS0", metavar="STR", help="kernel command line")
    parser.add_argument("--mem", type=parse_size, default=256 << 20, metavar="SIZE", help="guest RAM (default: 256M)")
    parser.add_argument("--vcpus", type=_positive_int, default=1, metavar="N", help="virtual CPUs (default: 1)")
    parser.add_argument("--disk", type=_disk_option, action="append", default=[], metavar="PATH[,readonly]",
                        help="attach a raw disk image as virtio-blk (as for run); its blocks move with the VM")
    parser.add_argument("--downtime-ms", type=float, default=50.0, metavar="MS",
                        help="pause the guest for the last round once it fits in this many ms (default: 50)")
    parser.add_argument("--max-time", type=_duration, default=120.0, metavar="DURATION",
                        help="give up (the VM runs on here) when pre-copy has not converged by then (default: 2m)")
    parser.add_argument("--no-auto-converge", action="store_true",
                        help="never throttle a guest that dirties memory faster than the link carries it")
    _add_migration_flags(parser)
    _add_operation_flags(parser, restoring=False)
    parser.set_defaults(handler=_migrate)


def _wait_for_migration_start(machine, args: argparse.Namespace):
    """None when it is time to migrate; the exit status if the guest ended first."""
    if not args.on_signal:
        return machine.wait(args.after or 0)
    import signal
    import threading

    go = threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda *_: go.set())
    try:
        while not go.is_set():
            status = machine.wait(0.05)
            if status is not None:
                return status
    finally:
        signal.signal(signal.SIGUSR1, previous)
    return None


def _migrate(args: argparse.Namespace) -> int:
    import json

    from snapvisor.machine import VM
    from snapvisor.migrate import MigrationError, migrate

    if args.downtime_ms <= 0:
        raise UsageError("--downtime-ms must be more than 0")
    repos = [_absolute_repo(r) for r in args.repo or _env_repos()]
    machine = VM.boot(args.kernel, mem=args.mem, vcpus=args.vcpus, cmdline=args.cmdline, initrd=args.initrd,
                      name=args.name, serial_out=sys.stdout.fileno(), disks=args.disk)
    with machine:
        try:
            # The API and schedule serve the VM until it leaves; none of them may
            # pause or snapshot it while it migrates.
            with _operated(machine, args, repos):
                status = _wait_for_migration_start(machine, args)
            if status is not None:
                return _finish(status)
            try:
                stats = migrate(machine, args.to, repo=repos[0] if repos else None, downtime_ms=args.downtime_ms,
                                max_time_s=args.max_time, auto_converge=not args.no_auto_converge,
                                io_timeout_s=args.timeout)
            except MigrationError as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                with _operated(machine, args, repos):
                    status = machine.wait()
                assert status is not None
                code = _finish(status)
                return code if code else exc.exit_code
        except KeyboardInterrupt:
            machine.stop()
            print("\nsnapvisor: interrupted, VM stopped", file=sys.stderr)
            return 130
    _log_to_stderr(json.dumps(stats.as_dict()) if args.json else
                   f"VM {machine.name} migrated to {args.to}: downtime {stats.downtime_s * 1000:.1f} ms, "
                   f"{stats.rounds} rounds, {stats.bytes_sent / 1e6:.1f} MB sent in {stats.total_s:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapvisor",
        description="A KVM micro-VM monitor for disaster recovery.",
        epilog=EXIT_CODES_HELP,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


@subcommand
def _add_demo(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "demo",
        help="boot the test guest, snapshot it full and incrementally, restore it",
        description=(
            "A one-minute tour on the project's own test guest: boot it, take a full and an "
            "incremental snapshot into a local repository while it runs, stop it, restore the "
            "newest snapshot lazily and show the guest resuming with its memory intact."
        ),
    )
    parser.add_argument(
        "--repo",
        default="snapvisor-demo-repo",
        metavar="URL",
        help="repository to write to: a path or s3://bucket/prefix (default: ./%(default)s)",
    )
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from snapvisor.demo import run_demo

    run_demo(args.repo)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except SnapvisorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read our output stopped (`snapvisor ls | head`): not a failure.
        # Point stdout at /dev/null so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
