"""Verbs that work on a repository: `ls`, `show`, `verify`, `prune`, `forget`, `gc`,
`repair-index`, `unlock`."""

from __future__ import annotations

import argparse
import sys

from snapvisor.cli.common import (
    EXIT_CODES_HELP,
    EXIT_DAMAGED,
    HelpFormatter,
    UsageError,
    add_json_flag,
    add_keep_flags,
    add_repo_flag,
    keep_policy,
    open_repo,
    print_json,
    subcommand,
)


@subcommand
def _add_ls(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "ls", help="list the snapshots in a repository",
        description="List a repository's snapshots, oldest first: id, time (UTC), age, VM, kind, "
                    "memory size, disk size and tags.",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    add_repo_flag(parser)
    parser.add_argument("--vm", metavar="NAME", help="only this VM's snapshots")
    parser.add_argument("--tag", metavar="TAG", help="only snapshots with this tag")
    add_json_flag(parser)
    parser.set_defaults(handler=_ls)


def _ls(args: argparse.Namespace) -> int:
    from snapvisor import humanize
    from snapvisor.control.controller import snapshot_json

    with open_repo(args) as repo:
        manifests, unreadable = repo.read_manifests()
    snapshots = sorted((m.info for m in manifests
                        if (args.vm is None or m.info.vm == args.vm) and (args.tag is None or args.tag in m.info.tags)),
                       key=lambda s: (s.time, s.id))
    listed = [snapshot_json(s) for s in snapshots]
    if args.json:
        print_json(listed)
    else:
        rows = [("ID", "TIME", "AGE", "VM", "KIND", "MEMORY", "DISKS", "TAGS")]
        rows += [(s.short_id, humanize.timestamp(s.time), humanize.age(s.time), s.vm, str(s.meta.get("kind", "-")),
                  humanize.size(j["memory_bytes"]), humanize.size(j["disk_bytes"]) if j["disk_bytes"] else "-",
                  ",".join(s.tags)) for s, j in zip(snapshots, listed)]
        # A damaged manifest has no time or VM to filter or sort by: listed last, always.
        rows += [(snapshot_id[:12], "DAMAGED", "-", "-", "-", "-", "-", "-") for snapshot_id in sorted(unreadable)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        print(f"{len(snapshots)} snapshot{'s' if len(snapshots) != 1 else ''}"
              + (f", {len(unreadable)} damaged" if unreadable else ""))
    for why in (unreadable[i] for i in sorted(unreadable)):
        print(f"damaged: {why}", file=sys.stderr)
    return EXIT_DAMAGED if unreadable else 0


@subcommand
def _add_show(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "show", help="details of one snapshot",
        description="Show one snapshot: time, VM, kind, parent, tags, memory regions, disks, stored "
                    "blobs and the compatibility record (what a host needs to restore it: image format, "
                    "the CPU feature words its guest was shown; and the snapvisor and host that wrote it).",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    add_repo_flag(parser)
    parser.add_argument("snapshot_id", metavar="ID", help="snapshot id or a unique prefix")
    add_json_flag(parser)
    parser.set_defaults(handler=_show)


def _show(args: argparse.Namespace) -> int:
    from snapvisor import humanize
    from snapvisor.control.controller import DISK_REGION_PREFIX

    with open_repo(args) as repo:
        info = repo.get_snapshot(args.snapshot_id).info
    if args.json:
        print_json({"id": info.id, "time": info.time.isoformat(), "vm": info.vm, "tags": info.tags,
                     "parent": info.parent, "regions": info.regions, "blobs": info.blobs, "meta": info.meta})
        return 0
    compat = info.meta.get("compat") if isinstance(info.meta.get("compat"), dict) else {}
    ram = {name: size for name, size in info.regions.items() if not name.startswith(DISK_REGION_PREFIX)}
    disks = {name[len(DISK_REGION_PREFIX):]: size for name, size in info.regions.items()
             if name.startswith(DISK_REGION_PREFIX)}
    lines = [
        ("snapshot", info.id),
        ("time", f"{humanize.timestamp(info.time)} ({humanize.age(info.time)})"),
        ("vm", info.vm),
        ("kind", str(info.meta.get("kind", "-"))),
        ("parent", info.parent or "-"),
        ("tags", ", ".join(info.tags) or "-"),
        ("memory", ", ".join(f"{name} {humanize.size(size)}" for name, size in sorted(ram.items())) or "-"),
        ("disks", ", ".join(f"{name} {humanize.size(size)}" for name, size in sorted(disks.items())) or "-"),
        ("blobs", ", ".join(info.blobs) or "-"),
    ]
    lines += _compat_lines(compat)
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}".replace("\n", "\n" + " " * (width + 2)))
    return 0


# The compatibility record's parts in the order `show` lists them; others follow, sorted.
_COMPAT_ORDER = ("image_format", "snapvisor", "host", "cpu_features")
_WORDS_PER_LINE = 3


def _compat_lines(compat: dict) -> list[tuple[str, str]]:
    """The compatibility record flattened for `show`: `compat.image_format  1.0`,
    `compat.host.kernel  6.1.0`, and the CPU feature words (`0x7.0.ebx=0x...`, in
    CPUID order) a few to a line; a value with line breaks continues under itself."""
    lines: list[tuple[str, str]] = []

    def add(key: str, value: object) -> None:
        if isinstance(value, dict) and key == "compat.image_format" and set(value) == {"major", "minor"}:
            lines.append((key, f"{value['major']}.{value['minor']}"))
        elif isinstance(value, dict) and key == "compat.cpu_features":
            words = [f"{word}={bits:#010x}" if isinstance(bits, int) else f"{word}={bits}"
                     for word, bits in sorted(value.items(), key=lambda item: _cpuid_order(item[0]))]
            rows = ["  ".join(words[i:i + _WORDS_PER_LINE]) for i in range(0, len(words), _WORDS_PER_LINE)]
            lines.append((key, "\n".join(rows) or "-"))
        elif isinstance(value, dict):
            for name in sorted(value):
                add(f"{key}.{name}", value[name])
        elif isinstance(value, list):
            lines.append((key, ", ".join(str(item) for item in value) or "-"))
        else:
            lines.append((key, str(value)))

    for name in sorted(compat, key=lambda n: (_COMPAT_ORDER.index(n) if n in _COMPAT_ORDER else len(_COMPAT_ORDER), n)):
        add(f"compat.{name}", compat[name])
    return lines


def _cpuid_order(word: str) -> tuple:
    """'0x80000001.0.ecx' -> (0x80000001, 0, 'ecx'): leaves in numeric order, not as text."""
    try:
        function, index, register = word.split(".")
        return (0, int(function, 16), int(index), register)
    except ValueError:
        return (1, 0, 0, word)


@subcommand
def _add_verify(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "verify", help="check a repository's integrity",
        description="Check that every snapshot's manifest, page maps and index entries are there "
                    "and consistent. With --read-data also read, decompress and hash every stored "
                    "page (slow: reads the whole repository). Exits 3 when anything is damaged.",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    add_repo_flag(parser)
    parser.add_argument("--read-data", action="store_true", help="also read and check every stored byte")
    add_json_flag(parser)
    parser.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace) -> int:
    from snapvisor import humanize
    from snapvisor.store.reader import reporting_progress

    with open_repo(args) as repo, humanize.Activity(f"verifying {repo.store.url}") as activity, \
            reporting_progress(activity):
        report = repo.verify(read_data=args.read_data)
    if args.json:
        print_json({"ok": report.ok, "errors": report.errors, "counts": report.counts,
                    "damaged_snapshots": report.damaged_snapshots})
    else:
        counts = report.counts
        print(f"{counts.get('snapshots', 0)} snapshots, {counts.get('packs', 0)} packs, "
              f"{counts.get('objects_referenced', 0)} referenced objects"
              + (f", {humanize.size(counts.get('bytes_read', 0))} read and checked" if args.read_data else ""))
        for error in report.errors:
            print(f"damaged: {error}")
        print("repository OK" if report.ok else f"{len(report.errors)} problem(s) found")
        if counts.get("unindexed_packs"):
            print(f"{counts['unindexed_packs']} pack(s) are in no index file: if index files were lost, "
                  f"`snapvisor repair-index` indexes them again (before any gc, which deletes them)")
    return 0 if report.ok else EXIT_DAMAGED


@subcommand
def _add_prune(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "prune", help="forget snapshots that the keep rules do not retain",
        description="Apply keep rules to each VM's snapshots (each VM on its own) and forget the "
                    "rest. Any remaining snapshot stays restorable: none depends on another. The "
                    "space is reclaimed by `snapvisor gc`.",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    add_repo_flag(parser)
    add_keep_flags(parser, "")
    parser.add_argument("--vm", metavar="NAME", help="only judge this VM's snapshots")
    parser.add_argument("--dry-run", action="store_true", help="show what would be forgotten, forget nothing")
    add_json_flag(parser)
    parser.set_defaults(handler=_prune)


def _prune(args: argparse.Namespace) -> int:
    from snapvisor import humanize

    policy = keep_policy(args)
    if policy is None:
        raise UsageError("prune needs at least one --keep-* rule (e.g. --keep-last 3); without one "
                         "it would forget every snapshot")
    with open_repo(args) as repo:
        result = repo.prune(policy, dry_run=args.dry_run, vm=args.vm)
        _, unreadable = repo.read_manifests()  # not judged, kept: `forget` gives them up
    for why in (unreadable[i] for i in sorted(unreadable)):
        print(f"damaged: {why}", file=sys.stderr)
    if args.json:
        print_json({"dry_run": result.dry_run, "keep": [s.id for s in result.keep],
                     "remove": [s.id for s in result.remove], "reasons": result.reasons,
                     "damaged": sorted(unreadable)})
        return EXIT_DAMAGED if unreadable else 0
    for snap in sorted(result.keep + result.remove, key=lambda s: (s.vm, s.time)):
        reasons = result.reasons.get(snap.id)
        verdict = f"keep    ({', '.join(reasons)})" if reasons else ("would forget" if args.dry_run else "forgot")
        print(f"{snap.short_id}  {humanize.timestamp(snap.time)}  {snap.vm}  {verdict}")
    print(f"{len(result.keep)} kept, {len(result.remove)} {'to forget (dry run)' if args.dry_run else 'forgotten'}"
          + ("; run `snapvisor gc` to reclaim their space" if result.remove and not args.dry_run else "")
          + (f"; {len(unreadable)} damaged, not judged" if unreadable else ""))
    return EXIT_DAMAGED if unreadable else 0


@subcommand
def _add_forget(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "forget", help="forget snapshots by id, damaged ones included",
        description="Forget the given snapshots (delete their manifests); their data goes with "
                    "`snapvisor gc`. The other snapshots are untouched: none depends on another. "
                    "A snapshot whose manifest is damaged (`ls` marks it DAMAGED) can only be "
                    "forgotten this way, and gc deletes nothing while it is there.",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    add_repo_flag(parser)
    parser.add_argument("snapshot_ids", nargs="+", metavar="ID", help="snapshot id or a unique prefix")
    parser.set_defaults(handler=_forget)


def _forget(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        ids = [repo.resolve(given) for given in args.snapshot_ids]  # all known before any is deleted
        for snapshot_id in ids:
            repo.delete_snapshot(snapshot_id)
            print(f"forgot {snapshot_id[:12]}")
    print("run `snapvisor gc` to reclaim their space")
    return 0


@subcommand
def _add_gc(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "gc", help="delete data no snapshot uses",
        description="Delete the packs and index entries that no remaining snapshot references "
                    "(after prune). Takes the repository's exclusive lock: a snapshot into the "
                    "repository meanwhile waits up to 30 s, then fails (a scheduled one is retried "
                    "and loses nothing).",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    add_repo_flag(parser)
    parser.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    add_json_flag(parser)
    parser.set_defaults(handler=_gc)


def _gc(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from snapvisor import humanize
    from snapvisor.store.reader import reporting_progress

    with open_repo(args) as repo, humanize.Activity(f"collecting garbage in {repo.store.url}") as activity, \
            reporting_progress(activity):
        result = repo.gc(dry_run=args.dry_run)
    blocked = EXIT_DAMAGED if result.unreadable_manifests or result.damaged_index_files else 0
    if args.json:
        print_json(asdict(result))
        return blocked
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{result.snapshots} snapshots use {result.packs_kept} packs; {verb} {result.packs_deleted} packs "
          f"({humanize.size(result.bytes_deleted)}); {humanize.size(result.unused_bytes_kept)} unused inside kept packs")
    if result.leftovers_removed:
        print(f"removed {result.leftovers_removed} leftover(s) of interrupted uploads")
    blockers = [result.unreadable_manifests[i] for i in sorted(result.unreadable_manifests)]
    blockers += [f"index file {key} is damaged ({why}); run `snapvisor repair-index`"
                 for key, why in sorted(result.damaged_index_files.items())]
    if blockers:
        print("gc would refuse to delete anything (the figures above count only what can be read):")
        for line in blockers:
            print(f"damaged: {line}")
    return blocked


@subcommand
def _add_repair_index(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "repair-index", help="rebuild lost or damaged index files from the packs",
        description="Read every pack that no intact index file lists, hash its objects and write "
                    "a new index file for them; then delete the damaged index files. Snapshots that "
                    "failed with 'not in the repository index' read again afterwards. Run it before "
                    "gc when verify reports packs in no index file: gc deletes such packs. Takes the "
                    "exclusive lock. Exits 3 when some pack cannot be indexed (its own frame table is "
                    "damaged, or a frame does not decompress); such packs are listed and left in place.",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    add_repo_flag(parser)
    parser.add_argument("--dry-run", action="store_true", help="show what would be indexed, write nothing")
    add_json_flag(parser)
    parser.set_defaults(handler=_repair_index)


def _repair_index(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from snapvisor import humanize

    with open_repo(args) as repo, humanize.Activity(f"repairing the index of {repo.store.url}"):
        result = repo.repair_index(dry_run=args.dry_run)
    if args.json:
        print_json(asdict(result))
    else:
        verb = "would index" if args.dry_run else "indexed"
        print(f"{result.index_files_read} intact index file(s); {verb} {result.packs_reindexed} pack(s) "
              f"({result.objects_reindexed} objects) that none listed")
        for key in result.damaged_index_files:
            print(f"damaged index file {'to delete' if args.dry_run else 'deleted'}: {key}")
        for line in result.unreadable_packs:
            print(f"cannot index: {line}")
    return EXIT_DAMAGED if result.unreadable_packs else 0


@subcommand
def _add_unlock(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "unlock", help="remove stale locks",
        description="Remove the repository's stale locks: those whose process on this host is gone, "
                    "those not refreshed within the lock lifetime (30 minutes; holders refresh every "
                    "5), and damaged ones. Snapshots, gc and verify already ignore stale locks and "
                    "remove them when they take theirs. With --all, remove live locks too: only when "
                    "no snapvisor on any host uses the repository, since gc could then delete data "
                    "that a running snapshot is about to reference.",
        epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    add_repo_flag(parser)
    parser.add_argument("--all", action="store_true", help="remove every lock, live ones included")
    add_json_flag(parser)
    parser.set_defaults(handler=_unlock)


def _unlock(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        if args.all:
            print("warning: removing every lock, live ones included: a snapshot or gc running now is no "
                  "longer protected from the other", file=sys.stderr)
        removed = repo.unlock(everything=args.all)
    if args.json:
        print_json([{"key": lock.key, "lock": lock.why} for lock in removed])
        return 0
    for lock in removed:
        print(f"removed {lock.why}")
    print(f"{len(removed)} lock(s) removed")
    return 0
