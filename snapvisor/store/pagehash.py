"""Per-page zero test and SHA-256 (or keyed HMAC-SHA256) over many pages per call.

A 1 GiB guest has 262,144 pages; one Python call per page would cost more than the
hashing itself. A small C helper (compiled on first use with the machine's C
compiler and OpenSSL's libcrypto, cached by source hash) does the whole batch with
the GIL released. Where no compiler is available, hashlib per page is the fallback:
correct, about a third slower.

Encrypted repositories name pages by HMAC-SHA256 under their id key (`id_key`):
the C helper computes the key's inner and outer SHA-256 states once per call and
copies them per page, so a keyed id costs the page's SHA-256 plus two blocks.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import os
import sys
import threading
from pathlib import Path

import numpy as np

from snapvisor.cache import cache_root

PAGE_SIZE = 4096
ID_SIZE = 32

_CDEF = """
size_t sv_hash_pages(const unsigned char *data, size_t npages, size_t page_size,
                     unsigned char *ids, unsigned char *nonzero, const unsigned char *key);
long sv_check_pages(const unsigned char *data, size_t npages, size_t page_size,
                    const unsigned char *ids, const unsigned char *key);
long sv_check_slots(const unsigned char *frame, size_t page_size, const uint32_t *slots,
                    size_t n, const unsigned char *ids, const unsigned char *key);
void sv_copy_pages(unsigned char *dst, const int64_t *dst_pages, const unsigned char *src,
                   const uint32_t *src_slots, size_t n, size_t page_size);
"""

_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <openssl/sha.h>

static int page_is_zero(const unsigned char *p, size_t n) {
    const uint64_t *w = (const uint64_t *)p;
    size_t words = n / 8, i;
    uint64_t acc = 0;
    /* Early exit on the first word: a non-zero page rarely starts with 64 zero bytes. */
    if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) return 0;
    for (i = 8; i < words; i += 8) {
        acc |= w[i] | w[i+1] | w[i+2] | w[i+3] | w[i+4] | w[i+5] | w[i+6] | w[i+7];
        if (acc) return 0;
    }
    return 1;
}

/* The id function: SHA-256, or HMAC-SHA256 under a 32-byte key (NULL: none). The
   HMAC pads are absorbed once per call; each id then copies the two states. */
typedef struct { SHA256_CTX inner, outer; int keyed; } id_fn;

static void id_init(id_fn *f, const unsigned char *key) {
    unsigned char pad[64];
    size_t i;
    f->keyed = key != NULL;
    if (!key) return;
    memset(pad, 0, sizeof pad);
    memcpy(pad, key, 32);
    for (i = 0; i < 64; i++) pad[i] ^= 0x36;
    SHA256_Init(&f->inner);
    SHA256_Update(&f->inner, pad, 64);
    for (i = 0; i < 64; i++) pad[i] ^= 0x36 ^ 0x5c;
    SHA256_Init(&f->outer);
    SHA256_Update(&f->outer, pad, 64);
}

static void page_id(const id_fn *f, const unsigned char *p, size_t n, unsigned char *md) {
    SHA256_CTX c;
    if (!f->keyed) {
        /* Not the one-shot SHA256(): in OpenSSL 3 it fetches the algorithm on every
           call, which costs a fifth of the time of hashing a 4 KiB page. */
        SHA256_Init(&c);
        SHA256_Update(&c, p, n);
        SHA256_Final(md, &c);
        return;
    }
    c = f->inner;
    SHA256_Update(&c, p, n);
    SHA256_Final(md, &c);
    c = f->outer;
    SHA256_Update(&c, md, 32);
    SHA256_Final(md, &c);
}

/* For each page: nonzero[i] = 0/1; ids[i] = the page's id, or 32 zero bytes
   for a zero page. Returns the number of non-zero pages. */
size_t sv_hash_pages(const unsigned char *data, size_t npages, size_t page_size,
                     unsigned char *ids, unsigned char *nonzero, const unsigned char *key) {
    size_t i, count = 0;
    id_fn f;
    id_init(&f, key);
    for (i = 0; i < npages; i++) {
        const unsigned char *p = data + i * page_size;
        if (page_is_zero(p, page_size)) {
            nonzero[i] = 0;
            memset(ids + 32 * i, 0, 32);
        } else {
            nonzero[i] = 1;
            page_id(&f, p, page_size, ids + 32 * i);
            count++;
        }
    }
    return count;
}

/* Returns -1 when every page hashes to its id, else the index of the first page
   that does not. */
long sv_check_pages(const unsigned char *data, size_t npages, size_t page_size,
                    const unsigned char *ids, const unsigned char *key) {
    unsigned char md[32];
    size_t i;
    id_fn f;
    id_init(&f, key);
    for (i = 0; i < npages; i++) {
        page_id(&f, data + i * page_size, page_size, md);
        if (memcmp(md, ids + 32 * i, 32) != 0) return (long)i;
    }
    return -1;
}

/* Checks the pages at frame + slots[i] * page_size against ids[i]. */
long sv_check_slots(const unsigned char *frame, size_t page_size, const uint32_t *slots,
                    size_t n, const unsigned char *ids, const unsigned char *key) {
    unsigned char md[32];
    size_t i;
    id_fn f;
    id_init(&f, key);
    for (i = 0; i < n; i++) {
        page_id(&f, frame + (size_t)slots[i] * page_size, page_size, md);
        if (memcmp(md, ids + 32 * i, 32) != 0) return (long)i;
    }
    return -1;
}

/* dst page dst_pages[i] = src page src_slots[i]; runs without the GIL. */
void sv_copy_pages(unsigned char *dst, const int64_t *dst_pages, const unsigned char *src,
                   const uint32_t *src_slots, size_t n, size_t page_size) {
    size_t i;
    for (i = 0; i < n; i++)
        memcpy(dst + (size_t)dst_pages[i] * page_size, src + (size_t)src_slots[i] * page_size,
               page_size);
}
"""

_lock = threading.Lock()
_lib = None  # the compiled module's (ffi, lib), False when it cannot be built


def _load_native():
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        if os.environ.get("SNAPVISOR_NO_NATIVE"):
            _lib = False
            return _lib
        digest = hashlib.sha256((_CDEF + _C_SOURCE + sys.version).encode()).hexdigest()[:16]
        name = f"_sv_pagehash_{digest}"
        build_dir = cache_root() / "native"
        try:
            found = list(build_dir.glob(f"{name}*.so")) if build_dir.is_dir() else []
            if not found:
                import cffi  # build-time only

                build_dir.mkdir(parents=True, exist_ok=True)
                ffibuilder = cffi.FFI()
                ffibuilder.cdef(_CDEF)
                ffibuilder.set_source(name, _C_SOURCE, libraries=["crypto"],
                                      extra_compile_args=["-O2", "-Wno-deprecated-declarations"])
                # Build in a private directory, then move into place: concurrent
                # first uses must not see a half-written module.
                tmp = build_dir / f"tmp-{os.getpid()}-{threading.get_ident()}"
                built = Path(ffibuilder.compile(tmpdir=str(tmp), verbose=False))
                os.replace(built, build_dir / built.name)
                found = [build_dir / built.name]
            spec = importlib.util.spec_from_file_location(name, found[0])
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _lib = (module.ffi, module.lib)
        except Exception:  # no compiler, no libcrypto headers: use hashlib
            _lib = False
        return _lib


def native_available() -> bool:
    return bool(_load_native())


def _id(page, id_key: bytes | None) -> bytes:
    """One page's id in Python (the fallback path)."""
    return hashlib.sha256(page).digest() if id_key is None else hmac.digest(id_key, page, "sha256")


def _key_arg(ffi, id_key: bytes | None):
    if id_key is None:
        return ffi.NULL
    if len(id_key) != ID_SIZE:
        raise ValueError("an id key is 32 bytes")
    return ffi.from_buffer(id_key)


def hash_pages(data, id_key: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Zero-test and hash whole pages of `data` (any buffer, a multiple of PAGE_SIZE);
    with `id_key`, the ids are HMAC-SHA256 under it.

    Returns (ids, nonzero): ids is (n, 32) uint8 with zero rows for zero pages,
    nonzero is a bool array of length n.
    """
    mv = memoryview(data).cast("B")
    npages = len(mv) // PAGE_SIZE
    ids = np.empty((npages, ID_SIZE), dtype=np.uint8)
    nonzero = np.empty(npages, dtype=np.uint8)
    native = _load_native()
    if native:
        ffi, lib = native
        lib.sv_hash_pages(ffi.from_buffer(mv), npages, PAGE_SIZE,
                          ffi.from_buffer(ids), ffi.from_buffer(nonzero), _key_arg(ffi, id_key))
    else:
        words = np.frombuffer(mv, dtype=np.uint64, count=npages * (PAGE_SIZE // 8))
        nz = words.reshape(npages, PAGE_SIZE // 8).any(axis=1)
        nonzero[:] = nz
        ids[:] = 0
        for i in np.flatnonzero(nz):
            ids[i] = np.frombuffer(_id(mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE], id_key), dtype=np.uint8)
    return ids, nonzero.view(bool)


def first_bad_page(data, ids: np.ndarray, id_key: bytes | None = None) -> int:
    """Index of the first page of `data` whose id differs from ids[i], or -1."""
    mv = memoryview(data).cast("B")
    npages = len(mv) // PAGE_SIZE
    ids = np.ascontiguousarray(ids, dtype=np.uint8)
    native = _load_native()
    if native:
        ffi, lib = native
        return int(lib.sv_check_pages(ffi.from_buffer(mv), npages, PAGE_SIZE, ffi.from_buffer(ids),
                                      _key_arg(ffi, id_key)))
    for i in range(npages):
        if _id(mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE], id_key) != ids[i].tobytes():
            return i
    return -1


def check_slots(frame, slots: np.ndarray, ids: np.ndarray, id_key: bytes | None = None) -> int:
    """Index i of the first page frame[slots[i]] whose id is not ids[i], or -1."""
    slots = np.ascontiguousarray(slots, dtype=np.uint32)
    ids = np.ascontiguousarray(ids, dtype=np.uint8)
    native = _load_native()
    if native:
        ffi, lib = native
        return int(lib.sv_check_slots(ffi.from_buffer(frame), PAGE_SIZE,
                                      ffi.from_buffer("uint32_t[]", slots),
                                      len(slots), ffi.from_buffer(ids), _key_arg(ffi, id_key)))
    mv = memoryview(frame).cast("B")
    for i, s in enumerate(slots.tolist()):
        if _id(mv[s * PAGE_SIZE:(s + 1) * PAGE_SIZE], id_key) != ids[i].tobytes():
            return i
    return -1


def copy_pages(dst, dst_pages: np.ndarray, src, src_slots: np.ndarray) -> None:
    """dst page dst_pages[i] = src page src_slots[i] (indices already bounds-checked)."""
    dst_pages = np.ascontiguousarray(dst_pages, dtype=np.int64)
    src_slots = np.ascontiguousarray(src_slots, dtype=np.uint32)
    native = _load_native()
    if native:
        ffi, lib = native
        lib.sv_copy_pages(ffi.from_buffer(dst, require_writable=True),
                          ffi.from_buffer("int64_t[]", dst_pages), ffi.from_buffer(src),
                          ffi.from_buffer("uint32_t[]", src_slots), len(dst_pages),
                          PAGE_SIZE)
        return
    out = np.frombuffer(dst, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    inp = np.frombuffer(src, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    out[dst_pages] = inp[src_slots]
