"""Versioned state of the stateful parts, and its upgrade from older versions.

Each part's `save()` writes `{"version": N, ...}`. A snapshot is read months later,
by a newer snapvisor, so `restore()` first brings the saved state up to the part's
current version through that part's upgrades: `upgrades[v]` turns a version-v
state into a version-v+1 one (adding a field with the value that reproduces the
old behaviour, say). Versions older than the oldest upgrade, and versions newer
than this release knows, are refused with a message that says which release can
restore them. The promise and its test are in docs/format.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from snapvisor.vmm.errors import VmStateError

Upgrade = Callable[[dict], dict]


def upgraded(part: str, state: dict, current: int, upgrades: Mapping[int, Upgrade] | None = None) -> dict:
    """`state` of `part` at version `current`; the input is not changed."""
    upgrades = upgrades or {}
    version = state.get("version") if isinstance(state, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise VmStateError(
            f"{part} state has no valid version ({version!r}); the snapshot is damaged: run `snapvisor verify`"
        )
    if version > current:
        raise VmStateError(
            f"{part} state version {version} was written by a newer snapvisor (this one reads up to version "
            f"{current}): restore the snapshot with that release or a later one"
        )
    oldest = min(upgrades, default=current)
    if version < oldest:
        raise VmStateError(
            f"{part} state version {version} is older than this snapvisor restores (versions {oldest} to "
            f"{current}): restore the snapshot with an older release and take a new one"
        )
    while version < current:
        state = dict(upgrades[version](dict(state)), version=version + 1)
        version += 1
    return state
