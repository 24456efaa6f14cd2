"""Where snapvisor keeps local caches (the built test guest, decoded repository
indexes): $SNAPVISOR_CACHE, else $XDG_CACHE_HOME/snapvisor, else ~/.cache/snapvisor.
Everything under it can be deleted at any time."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("SNAPVISOR_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "snapvisor"
