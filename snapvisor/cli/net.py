"""The network flags: `--net` for run, `--net-override` and `--no-announce` for
restore and receive."""

from __future__ import annotations

import argparse

NET_HELP = ("attach a virtio-net device (eth0, eth1, ... in order; repeatable) to host tap NAME, which must "
            "exist unless `create` is given; mac= sets the guest's MAC (default: a random local one)")


def net_option(value: str):
    """`tap=NAME[,mac=MAC][,create]`."""
    from snapvisor.vmm.builder import NetConfig

    fields: dict[str, str] = {}
    for item in value.split(","):
        key, sep, text = item.partition("=")
        if key in fields or (key == "create") == bool(sep) or key not in ("tap", "mac", "create"):
            raise argparse.ArgumentTypeError(f"cannot read {value!r}: write tap=NAME[,mac=MAC][,create]")
        fields[key] = text
    if not fields.get("tap"):
        raise argparse.ArgumentTypeError(f"{value!r} names no tap: write tap=NAME[,mac=MAC][,create]")
    return NetConfig(fields["tap"], fields.get("mac"), create="create" in fields)


def net_override(value: str) -> tuple[str, str]:
    """`OLD=NEW`: the tap named in the snapshot, and the one to use here."""
    old, sep, new = value.partition("=")
    if not (old and sep and new):
        raise argparse.ArgumentTypeError(f"cannot read {value!r}: write OLDTAP=NEWTAP")
    return old, new


def add_net_restore_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("network")
    group.add_argument("--net-override", type=net_override, action="append", default=[], metavar="OLD=NEW",
                       help="attach the network device that used tap OLD to tap NEW on this host (repeatable)")
    group.add_argument("--no-announce", action="store_true",
                       help="do not broadcast the guest's MAC (RARP, 5 times within 0.8 s) once it runs here")


def net_restore_options(args: argparse.Namespace):
    from snapvisor.cli.common import UsageError
    from snapvisor.vmm.builder import NetRestoreOptions

    taps = dict(args.net_override)
    if len(taps) != len(args.net_override):
        raise UsageError("--net-override names the same tap twice: give each old tap one new one")
    return NetRestoreOptions(taps=taps, announce=not args.no_announce)
