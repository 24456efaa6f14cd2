"""`snapvisor copy`: snapshots from one repository into another (3-2-1 backups)."""

from __future__ import annotations

import argparse
from pathlib import Path

from snapvisor.cli.common import (
    EXIT_CODES_HELP,
    HelpFormatter,
    UsageError,
    absolute_repo,
    add_json_flag,
    add_repo_flag,
    open_repo,
    print_json,
    subcommand,
)


@subcommand
def _add_copy(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "copy", help="copy snapshots into another repository (an off-site copy)",
        description="Copy snapshots from --from-repo into --repo (which must exist: `snapvisor init`), "
                    "e.g. from a local repository to S3, or from an unencrypted repository into an "
                    "encrypted one. Every page read is checked; only pages --repo lacks are written. "
                    "A copy keeps the snapshot's VM, time and tags; snapshots copied before are "
                    "skipped, so an interrupted copy run again resumes, and a scheduled one copies "
                    "only what is new. Without IDs or --vm, every snapshot is copied.",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    add_repo_flag(parser, text="the destination repository")
    parser.add_argument("--from-repo", required=True, metavar="URL", help="the source repository")
    parser.add_argument("--from-password-file", type=Path, metavar="FILE",
                        help="the source repository's password, read from FILE (default: "
                             "$SNAPVISOR_FROM_PASSWORD_FILE, $SNAPVISOR_FROM_PASSWORD_COMMAND)")
    parser.add_argument("snapshot_ids", nargs="*", metavar="ID", help="snapshot ids or unique prefixes")
    parser.add_argument("--vm", metavar="NAME", help="every snapshot of this VM")
    add_json_flag(parser)
    parser.set_defaults(handler=_copy)


def _copy(args: argparse.Namespace) -> int:
    from snapvisor import humanize
    from snapvisor.store import Repository
    from snapvisor.store.copy import copy_snapshots
    from snapvisor.store.password import PasswordSource

    if args.snapshot_ids and args.vm:
        raise UsageError("give snapshot ids or --vm, not both")
    source_password = PasswordSource.file(args.from_password_file) if args.from_password_file is not None \
        else PasswordSource.from_environment("SNAPVISOR_FROM_")
    with Repository.open_url(absolute_repo(args.from_repo), password=source_password) as source, \
            open_repo(args) as dest:
        if source.config["id"] == dest.config["id"]:
            raise UsageError(f"--from-repo and --repo are the same repository ({source.config['id']})")
        if args.snapshot_ids:
            ids = [source.resolve(i) for i in args.snapshot_ids]
        else:
            ids = [s.id for s in source.list_snapshots() if args.vm is None or s.vm == args.vm]
        with humanize.Activity(f"copying {len(ids)} snapshot(s) to {dest.store.url}"):
            result = copy_snapshots(source, dest, ids)
    if args.json:
        print_json(vars(result))
        return 0
    for sid, copy in result.copied.items():
        print(f"copied {sid[:12]} -> {copy[:12]}")
    print(f"{len(result.copied)} copied, {len(result.skipped)} already there; "
          f"{humanize.size(result.bytes_read)} read, {humanize.size(result.bytes_written)} written")
    return 0
