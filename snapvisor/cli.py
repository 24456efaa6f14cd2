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
    parser.set_defaults(handler=_run)


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
        )
        with build_microvm_for_boot(config) as vm:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapvisor",
        description="A KVM micro-VM monitor for disaster recovery.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except SnapvisorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
