"""`snapvisor demo`: the one-minute tour."""

from __future__ import annotations

import argparse

from snapvisor.cli.common import EXIT_CODES_HELP, HelpFormatter, subcommand


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
        epilog=EXIT_CODES_HELP,
        formatter_class=HelpFormatter,
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
