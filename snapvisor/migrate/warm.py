"""First-use costs moved out of the downtime.

cffi parses a C type string the first time it is used (pycparser, a fraction of
a millisecond each), and saving or restoring a VM uses a few dozen KVM structs:
~10 ms on a process's first save_state. A zstd compressor also costs ~1 ms to
create per thread. Both sides call `warm_up()` while the guest still runs.
"""

from __future__ import annotations

import numpy as np

from snapvisor.migrate.pages import compress_pages, decompress_pages
from snapvisor.store.pagehash import PAGE_SIZE
from snapvisor.vmm.kvm import ffi


def warm_up() -> None:
    _, structs, _ = ffi.list_types()
    for name in structs:
        ffi.typeof(f"struct {name}")
        ffi.typeof(f"struct {name} *")
    page = np.zeros(PAGE_SIZE, dtype=np.uint8)
    kind, frame = compress_pages(page)
    decompress_pages(kind, memoryview(frame), PAGE_SIZE)
