"""What every verb shares: the `@subcommand` registry, argument types, the
repository and operation flags, help formatting and exit codes."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import termios
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from snapvisor.errors import SnapvisorError

if TYPE_CHECKING:
    from snapvisor.control import VmController
    from snapvisor.migrate.tls import Protection

_SUBCOMMANDS: list[Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]] = []


def subcommand(add: Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]):
    """Register a function that adds one subparser and sets `handler` on it."""
    _SUBCOMMANDS.append(add)
    return add


def memory_size(text: str) -> int:
    """'256M', '1G', '512MiB', '4096K'; a bare number means MiB (humanize.parse_size)."""
    from snapvisor.humanize import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be at least 1")
    return value


@contextmanager
def terminal_input(fd: int) -> Iterator[int | None]:
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


EXIT_CODES_HELP = """exit status:
  0    success
  1    the operation failed (the message says what and how to fix it)
  2    bad arguments
  3    verify found damage in the repository; repair-index could not index a pack
  4    no VM answers on the API socket
  5    a migration's handover went out unconfirmed: the VM is paused on this host and may
       run on the target; check there, then `snapvisor resume --force` only if it does not
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM): handled as Ctrl-C is, the VM stopped in order
  run, restore and receive exit with the guest's power-off status (70: the VMM failed),
  0 when the VM moved to another host

environment:
  SNAPVISOR_REPO      repository URL when --repo is not given (a path, file:///path, s3://bucket/prefix)
  SNAPVISOR_PASSWORD_FILE     the password of an encrypted repository, from this file
  SNAPVISOR_PASSWORD_COMMAND  ... or printed by this command (e.g. 'pass show snapvisor')
  AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...
                      S3 endpoint and credentials, read the boto3 way
  SNAPVISOR_CACHE     this host's cache: decoded index files, the test guest (default:
                      $XDG_CACHE_HOME/snapvisor, else ~/.cache/snapvisor); deleting it is safe
"""

EXIT_DAMAGED = 3
EXIT_HANDOVER_UNCONFIRMED = 5  # migrate.HandoverUnconfirmed.exit_code (not imported: it loads the VMM)


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


def keep_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < -1:
        raise argparse.ArgumentTypeError(f"'{text}' must be -1 (no limit) or more")
    return value


def duration(text: str) -> float:
    from snapvisor.humanize import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document for scripts instead of text")


def add_repo_flag(parser: argparse.ArgumentParser, action: str = "store", text: str = "the repository",
                  password: bool = True) -> None:
    """--repo, and (unless `password` is False: the VMM holds it) --password-file."""
    parser.add_argument(
        "--repo", action=action, metavar="URL",
        help=f"{text}: a directory, file:///path or s3://bucket/prefix (default: $SNAPVISOR_REPO)",
    )
    if password:
        # Named so that `--password VALUE` is not taken as an abbreviation of
        # --password-file (whose errors would then print the password).
        parser.add_argument("--password", nargs="?", action=_RefusePassword, help=argparse.SUPPRESS)
        parser.add_argument(
            "--password-file", type=Path, metavar="FILE",
            help="the password of an encrypted repository, read from FILE (default: $SNAPVISOR_PASSWORD_FILE, "
                 "$SNAPVISOR_PASSWORD_COMMAND, else asked on the terminal); never on the command line")


class _RefusePassword(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error("a password is never given on the command line (every user of the host sees it, "
                     "and shell history keeps it): use --password-file FILE, SNAPVISOR_PASSWORD_FILE "
                     "or SNAPVISOR_PASSWORD_COMMAND")


def password_source(args: argparse.Namespace, prompt: bool = True):
    """Where this command's repository password comes from: --password-file, the
    environment, else (when `prompt` and stdin is a terminal) asked for when an
    encrypted repository needs it; None when there is no source (an unencrypted
    repository needs none)."""
    from snapvisor.store.password import PasswordSource

    if getattr(args, "password_file", None) is not None:
        return PasswordSource.file(args.password_file)
    source = PasswordSource.from_environment()
    if source is None and prompt and sys.stdin is not None and sys.stdin.isatty():
        return PasswordSource.terminal()
    return source


def export_password(args: argparse.Namespace) -> None:
    """--password-file FILE as SNAPVISOR_PASSWORD_FILE=FILE for this process, for the
    layers that open repositories by URL on their own (a migration's base snapshot)."""
    from snapvisor.store.password import ENV_COMMAND, ENV_FILE

    if getattr(args, "password_file", None) is not None:
        os.environ[ENV_FILE] = os.path.abspath(args.password_file)
        os.environ.pop(ENV_COMMAND, None)


def ask_password(prompt: str, confirm: bool = False) -> str:
    import getpass

    password = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != password:
        raise UsageError("the two passwords differ; nothing was changed")
    return password


def add_keep_flags(parser: argparse.ArgumentParser, when: str) -> None:
    group = parser.add_argument_group(
        "retention", f"which snapshots of each VM to keep{' ' + when if when else ''}; the others are forgotten "
        "(their data goes with `snapvisor gc`). Bucket rules keep the newest snapshot of each of "
        "the N most recent hours/days/...; -1 means no limit; rules add up.")
    for rule in _KEEP_RULES:
        group.add_argument(f"--keep-{rule}", type=keep_count, default=0, metavar="N",
                           help=f"keep the {'N newest snapshots' if rule == 'last' else 'newest snapshot of the last N ' + rule[:-2].replace('dai', 'day') + 's'}")
    group.add_argument("--keep-within", type=duration, metavar="DURATION",
                       help="keep every snapshot younger than DURATION before the newest (e.g. 2d)")


def keep_policy(args: argparse.Namespace):
    from datetime import timedelta

    from snapvisor.store import KeepPolicy

    within = timedelta(seconds=args.keep_within) if args.keep_within else None
    policy = KeepPolicy(**{rule: getattr(args, f"keep_{rule}") for rule in _KEEP_RULES}, within=within)
    return None if policy.is_empty() else policy


def repo_url(args: argparse.Namespace) -> str:
    url = args.repo or os.environ.get("SNAPVISOR_REPO")
    if not url:
        raise UsageError("no repository: give --repo URL or set SNAPVISOR_REPO")
    return absolute_repo(url)


def absolute_repo(url: str) -> str:
    # The VMM may run in another directory: send it paths it resolves the same way.
    return url if "://" in url else os.path.abspath(url)


def open_repo(args: argparse.Namespace):
    from snapvisor.store import Repository

    return Repository.open_url(repo_url(args), password=password_source(args))


def print_json(value: object) -> None:
    import json

    print(json.dumps(value, indent=2, default=str))


def add_operation_flags(parser: argparse.ArgumentParser, restoring: bool, serve_api: bool = True,
                        repo_text: str = "repository for scheduled snapshots (repeat for several)",
                        name_default: str | None = None) -> None:
    """The flags that make a VM operable: API socket (unless `serve_api` is False),
    name (its default described by `name_default`), schedule, retention, and (unless
    `restoring`) --repo, described by `repo_text`."""
    group = parser.add_argument_group("operation")
    if serve_api:
        group.add_argument("--api-sock", type=Path, metavar="PATH",
                           help="serve the control API (HTTP/JSON) on this Unix socket, owner-only; "
                                "`snapvisor snapshot --api-sock PATH` and curl --unix-socket talk to it")
    if name_default is None:
        name_default = "the snapshot's" if restoring else "vm-<random>"
    group.add_argument("--name", metavar="NAME",
                       help=f"the VM's name in snapshots; retention applies per name (default: {name_default})")
    group.add_argument("--snapshot-every", type=duration, metavar="DURATION",
                       help="snapshot the running guest every DURATION (30s, 15m, 1h) into "
                            + ("the repository it was restored from" if restoring else "each --repo")
                            + "; failed attempts retry with back-off and lose no dirty page")
    if not restoring:
        add_repo_flag(parser, action="append", text=repo_text)
    add_keep_flags(parser, "after each scheduled snapshot")
    add_tls_flags(parser)


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    """How this host's migrations (in, out, and those asked for through its API) are protected."""
    group = parser.add_argument_group(
        "migration security", "Migrations between hosts run over mutual TLS 1.3: both hosts have a\n"
        "certificate signed by one CA (docs/migration.md). Without TLS only loopback\n"
        "addresses are allowed, unless --insecure.")
    group.add_argument("--tls-cert", type=Path, metavar="PEM", help="this host's certificate (PEM; may hold the chain)")
    group.add_argument("--tls-key", type=Path, metavar="PEM", help="the private key of --tls-cert (PEM)")
    group.add_argument("--tls-ca", type=Path, metavar="PEM",
                       help="the CA certificate the other host's certificate must chain to")
    group.add_argument("--insecure", action="store_true",
                       help="allow migrations without TLS to and from non-loopback addresses: the VM's memory "
                            "crosses the network in clear, and any peer that reaches the port is accepted")


def migration_protection(args: argparse.Namespace) -> "Protection":
    """The migration Protection the --tls-* / --insecure flags ask for (built once
    per command: the certificate files are read, and the --insecure warning printed, once)."""
    if getattr(args, "protection", None) is not None:
        return args.protection
    from snapvisor.migrate.tls import TLS_FLAGS, MigrationTls, Protection, TlsFiles

    files = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key, "--tls-ca": args.tls_ca}
    missing = [flag for flag, value in files.items() if value is None]
    if 0 < len(missing) < len(files):
        raise UsageError(f"TLS needs all of {TLS_FLAGS}: {', '.join(missing)} missing")
    if not missing and args.insecure:
        raise UsageError(f"--insecure turns TLS off: give either {TLS_FLAGS}, or --insecure")
    if not missing:
        protection = Protection(tls=MigrationTls(TlsFiles(*files.values())))
    else:
        protection = Protection(insecure=args.insecure)
        if args.insecure:
            log_to_stderr("warning: --insecure: migrations of this host are neither authenticated nor encrypted; "
                          "anyone who reaches the port can read or inject a VM")
    args.protection = protection
    return protection


def schedule_from_args(args: argparse.Namespace, repos: list[str]):
    from snapvisor.control import Schedule

    policy = keep_policy(args)
    if args.snapshot_every is None:
        if policy is not None:
            raise UsageError("--keep-* applies after scheduled snapshots: add --snapshot-every")
        return None
    if not repos:
        raise UsageError("--snapshot-every needs a repository: give --repo URL or set SNAPVISOR_REPO")
    return Schedule(args.snapshot_every, tuple(absolute_repo(r) for r in repos), keep=policy)


def env_repos() -> list[str]:
    return [os.environ["SNAPVISOR_REPO"]] if os.environ.get("SNAPVISOR_REPO") else []


def log_to_stderr(line: str) -> None:
    print(f"snapvisor: {line}", file=sys.stderr, flush=True)


@contextmanager
def operated(vm, args: argparse.Namespace, repos: list[str]) -> Iterator["VmController | None"]:
    """The control API and schedule around a VM, when asked for; `vm` is a
    vmm Vm (from `run`) or an already wrapped machine.VM (from `restore`).
    Yields the controller (for run_to_exit), or None when nothing controls the VM."""
    from snapvisor.machine import VM

    schedule = schedule_from_args(args, repos)
    if isinstance(vm, VM):
        machine = vm
    elif args.api_sock is None and schedule is None:
        yield None  # no snapshots possible: no dirty log to keep
        return
    else:
        machine = VM(vm, args.name or f"vm-{os.urandom(3).hex()}")
    from snapvisor.control import serve

    # The password is read now, at start: scheduled and API snapshots run unattended,
    # and the API never carries one.
    source = password_source(args, prompt=False)
    with serve(machine, api_sock=args.api_sock, schedule=schedule, log=log_to_stderr,
               protection=migration_protection(args),
               password=source.resolved() if source is not None else None) as controller:
        yield controller


def finish(status) -> int:
    if status.reason == "error":
        print(f"error: {status.message}", file=sys.stderr)
    elif status.reason in ("reset", "migrated"):
        print(f"snapvisor: {status.message}", file=sys.stderr)
    return status.code


INTERRUPTED = 130
TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (systemd, docker stop, kill), raised in the main thread as Ctrl-C
    raises KeyboardInterrupt, so that it unwinds the same way: the VM stopped in
    order, the API socket removed, the scheduler stopped, locks released."""


def interrupt_status(exc: KeyboardInterrupt) -> int:
    return TERMINATED if isinstance(exc, Terminated) else INTERRUPTED


class _Sigterm:
    """The SIGTERM handler: raises Terminated, unless held."""

    def __init__(self) -> None:
        self.held = False
        self.pending = False  # one came while held

    def __call__(self, signum: int, frame: object) -> None:
        if self.held:
            self.pending = True
        else:
            raise Terminated()

    def hold(self) -> None:
        """From now on only note a SIGTERM, for a step that a stop in the middle
        would leave worse off than either of its ends (a migration's handover)."""
        self.held = True

    def release(self) -> None:
        """Raise Terminated now for a SIGTERM noted while held."""
        self.held = False
        if self.pending:
            self.pending = False
            raise Terminated()


sigterm = _Sigterm()


@contextmanager
def sigterm_handled() -> Iterator[None]:
    """SIGTERM raises Terminated in the block (only the main thread may set a handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        sigterm.held = sigterm.pending = False  # a migration that went through leaves them set


def interrupted(vm, exc: KeyboardInterrupt, controller: "VmController | None" = None) -> int:
    """Ctrl-C or SIGTERM in the foreground: stop the VM, say so, exit 130 or 143.
    With a controller, a migration asked through the API ends first (further
    SIGTERMs wait for it; Ctrl-C does not), and a VM that moved away exits 0."""
    if controller is None:
        vm.stop()
    else:
        sigterm.hold()
        status = controller.stop()
        if status.reason == "migrated":
            return finish(status)
    print(f"\nsnapvisor: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}, VM stopped",
          file=sys.stderr)
    return interrupt_status(exc)


def run_to_exit(vm, controller: "VmController | None" = None) -> int:
    """Wait in the foreground until the guest stops (or moves away through the
    API of `controller`); its power-off status is ours. A SIGTERM held while the VM
    arrived stops it now."""
    try:
        sigterm.release()
        status = vm.wait()
    except KeyboardInterrupt as exc:
        return interrupted(vm, exc, controller)
    assert status is not None
    return finish(status)

def disk_option(value: str):
    from snapvisor.vmm.devices.blockfile import DiskConfig

    path, _, option = value.rpartition(",")
    if option == "readonly" and path:
        return DiskConfig(Path(path), readonly=True)
    if path and not Path(value).exists():
        raise argparse.ArgumentTypeError(f"unknown disk option {option!r} in {value!r}: use PATH or PATH,readonly")
    return DiskConfig(Path(value))
