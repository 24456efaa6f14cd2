"""Fetches Debian's cloud kernel for the Linux boot tests and unpacks it.

`apt-get download` puts the .deb in a cache (~/.cache/snapvisor/linux, or
$SNAPVISOR_CACHE/linux), `dpkg-deb -x` takes `boot/vmlinuz-*` out of it, and
`extract_vmlinux` decompresses the bzImage's payload on the host into the ELF
`vmlinux` (what Firecracker boots), so the guest skips its own decompressor.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

META_PACKAGE = "linux-image-cloud-amd64"

_SETUP_SECTS = 0x1F1
_PAYLOAD_OFFSET = 0x248  # u32 offset of the compressed vmlinux from the protected-mode part; u32 length follows
_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_LEGACY_BLOCK = 8 << 20  # every block but the last decompresses to exactly this
_GZIP_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class KernelUnavailable(Exception):
    """The kernel package cannot be fetched here (no apt, no network)."""


def cache_dir() -> Path:
    root = os.environ.get("SNAPVISOR_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "snapvisor") / "linux"


def kernel_package() -> str:
    """The versioned package the meta package currently depends on."""
    if shutil.which("apt-cache") is None:
        raise KernelUnavailable("apt-cache is not installed (not a Debian-based host)")
    result = subprocess.run(["apt-cache", "depends", META_PACKAGE], capture_output=True, text=True, check=False)
    for line in result.stdout.splitlines():
        name = line.strip().removeprefix("Depends: ")
        if name.startswith("linux-image-") and name != META_PACKAGE and line.strip().startswith("Depends:"):
            return name
    raise KernelUnavailable(f"apt-cache knows no {META_PACKAGE} here (run apt-get update?): {result.stderr.strip()}")


def fetch_bzimage() -> Path:
    """The cached vmlinuz of the current Debian cloud kernel, downloading it once."""
    package = kernel_package()
    target = cache_dir() / package / "vmlinuz"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        download = subprocess.run(
            ["apt-get", "download", package], cwd=work, capture_output=True, text=True, check=False
        )
        debs = list(Path(work).glob("*.deb"))
        if download.returncode != 0 or not debs:
            raise KernelUnavailable(f"apt-get download {package} failed: {download.stderr.strip()[-500:]}")
        unpacked = Path(work) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        (vmlinuz,) = (unpacked / "boot").glob("vmlinuz-*")
        staged = Path(work) / "vmlinuz"
        shutil.move(vmlinuz, staged)
        os.replace(staged, target)  # atomic: concurrent test runs see all or nothing
    return target


def compressed_payload(bzimage: bytes) -> bytes:
    setup_size = ((bzimage[_SETUP_SECTS] or 4) + 1) * 512
    offset, length = struct.unpack_from("<II", bzimage, _PAYLOAD_OFFSET)
    start = setup_size + offset
    return bzimage[start : start + length]


def decompress_lz4_legacy(data: bytes) -> bytes:
    """LZ4 legacy frames (what `lz4 -l` writes): a magic, then blocks each led by
    its compressed size; the kernel build appends the uncompressed size as a
    final u32, which is where the blocks end."""
    import lz4.block

    position = 4
    blocks = []
    while position + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, position)
        position += 4
        if size == _LZ4_LEGACY_MAGIC:
            continue  # a new frame begins
        if position + size > len(data):
            break  # the trailing size word, not a block
        blocks.append(lz4.block.decompress(data[position : position + size], uncompressed_size=_LZ4_LEGACY_BLOCK))
        position += size
    return b"".join(blocks)


def decompress_payload(payload: bytes) -> bytes:
    if struct.unpack_from("<I", payload)[0] == _LZ4_LEGACY_MAGIC:
        return decompress_lz4_legacy(payload)
    if payload.startswith(_GZIP_MAGIC):
        return gzip.decompress(payload)
    if payload.startswith(_XZ_MAGIC):
        return lzma.decompress(payload)
    if payload.startswith(_ZSTD_MAGIC):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    raise ValueError(f"unknown kernel payload compression (magic {payload[:6].hex()})")


def extract_vmlinux(bzimage_path: Path) -> Path:
    """The ELF vmlinux inside a bzImage, decompressed once and cached beside it."""
    target = bzimage_path.with_name("vmlinux")
    if target.is_file():
        return target
    vmlinux = decompress_payload(compressed_payload(bzimage_path.read_bytes()))
    if not vmlinux.startswith(b"\x7fELF"):
        raise ValueError("the decompressed kernel payload is not an ELF file")
    staged = target.with_suffix(".part")
    staged.write_bytes(vmlinux)
    os.replace(staged, target)
    return target
