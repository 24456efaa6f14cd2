"""Builds the project's own test guest (guests/testguest) with the machine's gcc.

The ELF is cached under a hash of its sources and of the compiler's version:
``<cache root>/testguest/<hash>/testguest.elf`` (see snapvisor.cache). Each build runs in its own temporary directory and the
result is renamed into place, so concurrent test processes never see a partial file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from snapvisor.cache import cache_root
from snapvisor.errors import SnapvisorError

SOURCE_DIR = Path(__file__).resolve().parents[1] / "guests" / "testguest"
ELF_NAME = "testguest.elf"
# What make reads; documentation and build output do not change the image.
_SOURCE_SUFFIXES = {".c", ".h", ".S", ".ld"}
_TOOLS = ("make", "gcc", "ld")


class TestGuestError(SnapvisorError):
    """The test guest could not be built."""

    __test__ = False  # a library class, not a pytest test case


class TestGuestSourceError(TestGuestError):
    """The guest's sources are missing (not a full checkout)."""


class TestGuestToolchainError(TestGuestError):
    """make, gcc or ld is not installed."""


class TestGuestBuildError(TestGuestError):
    """make failed; the message carries the end of its output."""


def cache_dir() -> Path:
    return cache_root() / "testguest"


def _source_files(src: Path) -> list[Path]:
    files = [p for p in src.rglob("*") if p.is_file() and p.suffix in _SOURCE_SUFFIXES]
    files.append(src / "Makefile")
    return sorted(files)


def _check_sources(src: Path) -> None:
    if not (src / "Makefile").is_file():
        raise TestGuestSourceError(
            f"test guest sources not found at {src} (expected a Makefile there); "
            "run from a full snapvisor checkout"
        )


def _check_tools() -> None:
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        raise TestGuestToolchainError(
            f"cannot build the test guest: {', '.join(missing)} not found on PATH; "
            "install them (Debian: apt-get install gcc make binutils)"
        )


def source_hash(src: Path | None = None) -> str:
    """Hash of the guest's sources and the gcc that builds them."""
    src = SOURCE_DIR if src is None else src
    h = hashlib.sha256()
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=False)
    h.update(gcc.stdout.encode())
    for path in _source_files(src):
        h.update(str(path.relative_to(src)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build(force: bool = False) -> Path:
    """Return the path of the built guest ELF, building it if needed (or if force)."""
    src = SOURCE_DIR
    _check_sources(src)
    _check_tools()
    dest = cache_dir() / source_hash(src)
    elf = dest / ELF_NAME
    if elf.is_file() and not force:
        return elf
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=dest))
    try:
        proc = subprocess.run(
            ["make", "-s", "-C", str(src), f"O={tmp}"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise TestGuestBuildError(
                f"building the test guest in {src} failed (make exit {proc.returncode}):\n{tail}"
            )
        os.replace(tmp / ELF_NAME, elf)  # atomic: readers see the old file or the new one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return elf
