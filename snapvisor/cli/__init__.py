"""The `snapvisor` command: a thin argparse front end. All behaviour lives in
the packages below; each verb is one function that declares its arguments and a
handler (`@subcommand` in common.py), in the module for its group of verbs, so
adding a verb touches nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys

from snapvisor import __version__
from snapvisor.cli.common import _SUBCOMMANDS, EXIT_CODES_HELP, HelpFormatter, interrupt_status, sigterm_handled
from snapvisor.errors import SnapvisorError

# isort: off
# Importing the verb modules registers their verbs, in the order `--help` lists them.
from snapvisor.cli import vm, keys, repository, copy, migration, demo  # noqa: E402, F401
# isort: on

__all__ = ["main", "build_parser"]


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_handled():
            return args.handler(args)
    except SnapvisorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        return interrupt_status(exc)
    except BrokenPipeError:
        # Whoever read our output stopped (`snapvisor ls | head`): not a failure.
        # Point stdout at /dev/null so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
