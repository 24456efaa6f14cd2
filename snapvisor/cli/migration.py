"""Verbs that move a running VM to another host: `receive`, `migrate`."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Callable

from snapvisor.cli.common import (
    EXIT_CODES_HELP,
    EXIT_HANDOVER_UNCONFIRMED,
    HelpFormatter,
    UsageError,
    absolute_repo,
    add_json_flag,
    add_operation_flags,
    disk_option,
    duration,
    env_repos,
    export_password,
    finish,
    interrupted,
    log_to_stderr,
    memory_size,
    migration_protection,
    operated,
    positive_int,
    print_json,
    run_to_exit,
    sigterm,
    subcommand,
)
from snapvisor.cli.net import NET_HELP, add_net_restore_flags, net_option, net_restore_options


def _add_timeout_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--timeout", type=duration, default=20.0, metavar="DURATION",
                        help="treat the connection as cut after this long without progress; it bounds every "
                             "wait of the handover (default: 20s)")


def _add_migration_flags(parser: argparse.ArgumentParser) -> None:
    _add_timeout_flag(parser.add_argument_group("migration"))
    add_json_flag(parser)


@subcommand
def _add_receive(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "receive", help="wait for a VM migrating in, then run it here",
        description="Listen for one live migration (`snapvisor migrate --to` on the source host), "
                    "then run the arrived VM in the foreground like `run`, its console on this "
                    "terminal. Pages the source's newest snapshot shares are read from --repo when "
                    "both hosts can read it. Nothing runs here unless the migration completes. "
                    "A SIGTERM once the migration has begun takes effect when it has ended.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, metavar="ADDR:PORT",
                        help="address to accept the migration on, e.g. 192.0.2.2:7000 or [2001:db8::2]:7000")
    parser.add_argument("--wait", type=duration, metavar="DURATION",
                        help="give up when no migration arrives within DURATION (default: wait forever)")
    parser.add_argument("--disk-dir", type=Path, metavar="DIR",
                        help="write the VM's disks here as new sparse images (vda.img, ...) and attach them; "
                             "needed when the VM has disks")
    add_net_restore_flags(parser)
    _add_migration_flags(parser)
    add_operation_flags(parser, restoring=False, name_default="the migrating VM's own name")
    parser.set_defaults(handler=_receive)


def _receive(args: argparse.Namespace) -> int:
    import json

    from snapvisor.migrate import listen, receive

    protection = migration_protection(args)
    listener = listen(args.listen, protection)
    log_to_stderr(f"waiting for a migration on {args.listen}" + (" (TLS)" if protection.tls else ""))
    repos = [absolute_repo(r) for r in args.repo or env_repos()]
    export_password(args)  # the receiver opens the base snapshot's repository by URL

    def connected(peer: str) -> None:
        # Once the sender says go it never resumes its copy: a stop here in the
        # middle would leave the guest running nowhere. run_to_exit acts on it.
        sigterm.hold()
        log_to_stderr(f"migration from {peer} started")

    received = receive(listener, repos=repos, serial_out=sys.stdout.fileno(), accept_timeout_s=args.wait,
                       io_timeout_s=args.timeout, on_connect=connected, disk_dir=args.disk_dir, name=args.name,
                       net=net_restore_options(args), protection=protection,
                       on_refused=lambda why: log_to_stderr(f"{why}; still waiting"))
    machine = received.machine
    report = {"vm": machine.name, "downtime_s": received.downtime_s, "build_s": received.build_s,
              "pages": received.pages, "bytes_received": received.bytes_received}
    log_to_stderr(json.dumps(report) if args.json else
                   f"VM {machine.name} migrated in and resumed; downtime {received.downtime_s * 1000:.1f} ms")
    with machine, operated(machine, args, repos) as controller:
        return run_to_exit(machine, controller)


MIGRATE_DESCRIPTION = """\
Move a VM to `snapvisor receive --listen ADDR:PORT` on another host while its guest
runs (pre-copy: memory and disk blocks are sent while the guest runs, then it pauses
for the last pages and its state). Two forms:

  snapvisor migrate --api-sock PATH --to ADDR:PORT
      Move the VM that `run`, `restore` or `receive` serves on the API socket PATH.
      Exits 0 once the VM runs on the other host (the VM's own process then exits 0,
      saying where it moved); 1 when it did not move (it keeps running where it was,
      and the message says why); 4 when no VM answers on PATH; 5 when the handover
      went out unconfirmed: the VM is paused here (GET /vm: HandoverUnconfirmed) and
      may run on the other host. Check there; only if it does not run there,
      `snapvisor resume --force --api-sock PATH` runs it here again.

  snapvisor migrate --kernel PATH --to ADDR:PORT [--after DURATION | --on-signal]
      Boot a kernel as `run` does, let it run for --after (or until SIGUSR1), then
      move it. On success this command exits 0; on failure the VM keeps running
      here, the error says why, and this command serves it until it powers off.
      After an unconfirmed handover the VM stays paused here until SIGUSR1 (send
      it only once the other host is known not to run the VM) resumes it.
      A SIGTERM during the migration takes effect when it has ended (--max-time
      bounds it).
"""


@subcommand
def _add_migrate(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "migrate", help="live-migrate a running VM (or one booted here) to another host",
        description=MIGRATE_DESCRIPTION, epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", required=True, metavar="ADDR:PORT", help="the receiving host's --listen address")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--api-sock", type=Path, metavar="PATH",
                       help="the running VM's API socket (its `run`/`restore`/`receive --api-sock`)")
    which.add_argument("--kernel", type=Path, metavar="PATH", help="boot this kernel here (as for run), then move it")
    parser.add_argument("--downtime-ms", type=float, default=50.0, metavar="MS",
                        help="pause the guest for the last round once it fits in this many ms (default: 50)")
    parser.add_argument("--max-time", type=duration, default=120.0, metavar="DURATION",
                        help="give up (the VM runs on where it was) when pre-copy has not converged by then "
                             "(default: 2m)")
    parser.add_argument("--no-auto-converge", action="store_true",
                        help="never throttle a guest that dirties memory faster than the link carries it")
    _add_timeout_flag(parser)
    parser.add_argument("--tls-server-name", metavar="NAME",
                        help="the name the receiver's TLS certificate must have (default: the host of --to)")
    add_json_flag(parser)
    boot = parser.add_argument_group("boot form (with --kernel)")
    when = boot.add_mutually_exclusive_group()
    when.add_argument("--after", type=duration, metavar="DURATION",
                      help="let the guest run this long before migrating (default: at once)")
    when.add_argument("--on-signal", action="store_true",
                      help="migrate when this process receives SIGUSR1 (kill -USR1 PID)")
    boot.add_argument("--initrd", type=Path, metavar="PATH", help="initial ramdisk to load for the kernel")
    boot.add_argument("--cmdline", default="console=ttyS0", metavar="STR", help="kernel command line")
    boot.add_argument("--mem", type=memory_size, default=256 << 20, metavar="SIZE", help="guest RAM (default: 256M)")
    boot.add_argument("--vcpus", type=positive_int, default=1, metavar="N", help="virtual CPUs (default: 1)")
    boot.add_argument("--disk", type=disk_option, action="append", default=[], metavar="PATH[,readonly]",
                      help="attach a raw disk image as virtio-blk (as for run); its blocks move with the VM")
    boot.add_argument("--net", type=net_option, action="append", default=[], metavar="tap=NAME[,mac=MAC][,create]",
                      help=NET_HELP + " (as for run; the receiver needs a tap of that name or --net-override)")
    add_operation_flags(parser, restoring=False, serve_api=False,
                        repo_text="a repository both hosts read (with `receive --repo`): B reads from it the "
                                  "pages of the VM's newest snapshot there instead of receiving them; with "
                                  "--kernel it may be repeated, scheduled snapshots go to each and the first "
                                  "serves the migration")
    parser.set_defaults(handler=functools.partial(_migrate, parser))


# What `migrate --api-sock` takes; every other flag belongs to the boot form.
_RUNNING_VM_FLAGS = {"to", "api_sock", "kernel", "downtime_ms", "max_time", "no_auto_converge", "repo", "json",
                     "timeout", "tls_server_name", "handler"}


def _ask_to_migrate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The running-VM form: PUT /migrate on its API socket."""
    from snapvisor import humanize
    from snapvisor.control import ApiClient, ControlError

    stray = sorted(f"--{dest.replace('_', '-')}" for dest, value in vars(args).items()
                   if dest not in _RUNNING_VM_FLAGS and value != parser.get_default(dest))
    if stray:
        raise UsageError(f"{', '.join(stray)}: only for a VM booted here (--kernel); a running VM keeps its own")
    repos = [absolute_repo(r) for r in args.repo or env_repos()]
    if len(repos) > 1:
        raise UsageError("give one --repo: the repository both hosts read")
    api = ApiClient(args.api_sock)
    try:
        with humanize.Activity(f"migrating to {args.to}"):
            stats = api.migrate(args.to, downtime_ms=args.downtime_ms, max_time=args.max_time,
                                auto_converge=not args.no_auto_converge, repo=repos[0] if repos else None,
                                timeout=args.timeout, tls_server_name=args.tls_server_name)
    except ControlError as exc:
        if exc.status == 502 and api.vm()["state"] == "HandoverUnconfirmed":
            exc.exit_code = EXIT_HANDOVER_UNCONFIRMED
        raise
    if args.json:
        print_json(stats)
    else:
        print(f"the VM on {args.api_sock} moved to {args.to}: downtime {stats['downtime_s'] * 1000:.1f} ms, "
              f"{stats['rounds']} rounds, {humanize.size(stats['bytes_sent'])} sent in "
              f"{humanize.duration(stats['total_s'])}")
    return 0


@subcommand
def _add_resume(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "resume", help="resume a paused VM through its API socket (--force after an unconfirmed handover)",
        description="Resume the guest of a VM served on --api-sock that is paused: by the operator "
                    "(PUT /vm/state), or by a migration whose handover went out unconfirmed (state "
                    "HandoverUnconfirmed, `migrate` exit status 5). In that state the target host may "
                    "be running the VM: check it there first, and give --force only if it does not "
                    "run there; two running copies would both write its disks and use its identity.",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    parser.add_argument("--api-sock", type=Path, required=True, metavar="PATH", help="the VM's API socket")
    parser.add_argument("--force", action="store_true",
                        help="resume after an unconfirmed handover (the target is known not to run the VM)")
    parser.set_defaults(handler=_resume)


def _resume(args: argparse.Namespace) -> int:
    from snapvisor.control import ApiClient

    api = ApiClient(args.api_sock)
    api.resume(force=args.force)
    print(f"the VM on {args.api_sock} runs")
    return 0


def _wait_for_migration_start(machine, args: argparse.Namespace):
    """None when it is time to migrate; the exit status if the guest ended first."""
    if not args.on_signal:
        return machine.wait(args.after or 0)
    return _wait_for_sigusr1(machine)


def _wait_for_sigusr1(machine, armed: Callable[[], None] = lambda: None):
    """None once SIGUSR1 arrives; the exit status if the guest ends first. `armed`
    runs once the signal is caught (before, SIGUSR1 would end the process)."""
    import signal
    import threading

    go = threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda *_: go.set())
    try:
        armed()
        while not go.is_set():
            status = machine.wait(0.05)
            if status is not None:
                return status
    finally:
        signal.signal(signal.SIGUSR1, previous)
    return None


def _migrate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.downtime_ms <= 0:
        raise UsageError("--downtime-ms must be more than 0")
    if args.api_sock is not None:
        return _ask_to_migrate(parser, args)
    import json

    from snapvisor.machine import VM
    from snapvisor.migrate import HandoverUnconfirmed, MigrationError, migrate
    from snapvisor.migrate.stream import parse_address

    repos = [absolute_repo(r) for r in args.repo or env_repos()]
    protection = migration_protection(args)
    protection.check_address(parse_address(args.to)[0], f"migrating to {args.to}")  # before the VM boots
    export_password(args)  # the sender opens the base snapshot's repository by URL
    machine = VM.boot(args.kernel, mem=args.mem, vcpus=args.vcpus, cmdline=args.cmdline, initrd=args.initrd,
                      name=args.name, serial_out=sys.stdout.fileno(), disks=args.disk, nets=args.net)
    with machine:
        try:
            # The schedule serves the VM until it leaves; it may not snapshot it
            # while it migrates.
            with operated(machine, args, repos):
                status = _wait_for_migration_start(machine, args)
            if status is not None:
                return finish(status)
            # A SIGTERM waits for the migration's end (--max-time bounds it): cut in
            # the middle of the handover, the guest could run on both hosts or on
            # neither. After a failure it stops the VM here (run_to_exit); after
            # success there is nothing left here to stop.
            sigterm.hold()
            try:
                stats = migrate(machine, args.to, repo=repos[0] if repos else None, downtime_ms=args.downtime_ms,
                                max_time_s=args.max_time, auto_converge=not args.no_auto_converge,
                                io_timeout_s=args.timeout, protection=protection,
                                server_name=args.tls_server_name)
            except MigrationError as exc:
                if isinstance(exc, HandoverUnconfirmed):
                    # This form has no API socket to resume through: SIGUSR1 resumes.
                    sigterm.release()
                    message = f"error: {exc.resumed_by(f'kill -USR1 {os.getpid()}')}"
                    if _wait_for_sigusr1(machine, lambda: print(message, file=sys.stderr, flush=True)) is None:
                        machine.resume()
                        log_to_stderr(f"VM {machine.name} resumed here by SIGUSR1")
                else:
                    print(f"error: {exc}", file=sys.stderr, flush=True)
                with operated(machine, args, repos) as controller:
                    code = run_to_exit(machine, controller)
                return code if code else exc.exit_code
        except KeyboardInterrupt as exc:
            return interrupted(machine, exc)
    log_to_stderr(json.dumps(stats.as_dict()) if args.json else
                   f"VM {machine.name} migrated to {args.to}: downtime {stats.downtime_s * 1000:.1f} ms, "
                   f"{stats.rounds} rounds, {stats.bytes_sent / 1e6:.1f} MB sent in {stats.total_s:.2f} s")
    return 0
