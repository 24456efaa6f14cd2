"""Verbs that create a repository and manage its keys: `init`, `key list|add|remove|passwd`."""

from __future__ import annotations

import argparse
from pathlib import Path

from snapvisor.cli.common import (
    EXIT_CODES_HELP,
    HelpFormatter,
    UsageError,
    add_json_flag,
    add_repo_flag,
    ask_password,
    open_repo,
    password_source,
    print_json,
    repo_url,
    subcommand,
)


@subcommand
def _add_init(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "init", help="create a repository (encrypted unless told otherwise)",
        description="Create an empty repository. It is encrypted: a random master key, kept in keys/ "
                    "wrapped by a key derived from the password (scrypt); every stored object is "
                    "sealed with AES-256-GCM and named by a keyed hash, so whoever reads the bucket "
                    "learns nothing of the guests. Keep the password: without it the snapshots "
                    "cannot be read by anyone.",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    add_repo_flag(parser)
    parser.add_argument("--insecure-no-encryption", action="store_true",
                        help="store snapshots in the clear (anyone who can read the repository reads "
                             "the guests' memory: keys, passwords, tokens)")
    parser.set_defaults(handler=_init)


def _init(args: argparse.Namespace) -> int:
    from snapvisor.store import Repository, open_backend
    from snapvisor.store.password import WAYS, PasswordSource

    url = repo_url(args)
    if args.insecure_no_encryption:
        if args.password_file is not None:
            raise UsageError("--insecure-no-encryption and --password-file contradict each other: give one")
        password = None
    else:
        password = password_source(args, prompt=False)
        if password is None:
            if not _interactive():
                raise UsageError(f"no password for the new repository: give it with {WAYS}, or create an "
                                 f"unencrypted one with --insecure-no-encryption")
            password = PasswordSource.given(ask_password("new repository password: ", confirm=True))
    with Repository.init(open_backend(url), password=password) as repo:
        print(f"created {'encrypted' if repo.encrypted else 'UNENCRYPTED'} repository {repo.config['id']} "
              f"at {url}" + (f" (key {repo.key_id[:8]}); keep the password safe: without it the "
                             f"snapshots cannot be read" if repo.encrypted else ""))
    return 0


@subcommand
def _add_key(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "key", help="list, add, remove or change the passwords of an encrypted repository",
        description="Each key file in keys/ wraps the repository's master key under one password. "
                    "`add` a password for another person or host, `remove` one (never the last, nor "
                    "the one given to this command), `passwd` replaces the one given.",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    verbs = parser.add_subparsers(title="key commands", metavar="VERB", required=True)
    listing = verbs.add_parser("list", help="the key files: id, created, host, user")
    add_repo_flag(listing)
    add_json_flag(listing)
    listing.set_defaults(handler=_key_list)
    for verb, text, handler in (("add", "add a key file for a new password", _key_add),
                                ("passwd", "replace the key of the password given by one for a new password",
                                 _key_passwd)):
        sub = verbs.add_parser(verb, help=text)
        add_repo_flag(sub)
        sub.add_argument("--new-password-file", type=Path, metavar="FILE",
                         help="the new password, read from FILE (default: asked on the terminal)")
        sub.set_defaults(handler=handler)
    remove = verbs.add_parser("remove", help="remove a key file")
    add_repo_flag(remove)
    remove.add_argument("key_id", metavar="ID", help="key id or a unique prefix (see `snapvisor key list`)")
    remove.set_defaults(handler=_key_remove)


def _interactive() -> bool:
    import sys

    return sys.stdin is not None and sys.stdin.isatty()


def _new_password(args: argparse.Namespace):
    from snapvisor.store.password import PasswordSource

    if args.new_password_file is not None:
        return PasswordSource.file(args.new_password_file)
    if not _interactive():
        raise UsageError("no new password: give it with --new-password-file FILE")
    return PasswordSource.given(ask_password("new password: ", confirm=True))


def _key_list(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        keys = repo.keys()
    if args.json:
        print_json([vars(k) for k in keys])
        return 0
    rows = [(" ", "ID", "CREATED", "HOST", "USER")]
    rows += [("*" if k.current else " ", k.id[:8], k.created[:19].replace("T", " "), k.host, k.user) for k in keys]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _key_add(args: argparse.Namespace) -> int:
    new = _new_password(args)
    with open_repo(args) as repo:
        key_id = repo.add_key(new)
    print(f"added key {key_id[:8]}")
    return 0


def _key_passwd(args: argparse.Namespace) -> int:
    new = _new_password(args)
    with open_repo(args) as repo:
        old = repo.key_id
        key_id = repo.change_password(new)
    print(f"replaced key {old[:8]} by key {key_id[:8]}")
    return 0


def _key_remove(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        removed = repo.remove_key(args.key_id)
    print(f"removed key {removed[:8]}")
    return 0
