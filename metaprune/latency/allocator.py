"""The C allocator's steady state, so a latency does not depend on the process's history.

glibc's malloc serves a large block (over its mmap threshold) with fresh pages and returns
freed memory at the top of its heap to the system once more than the trim threshold is free.
Both thresholds start at 128 KiB and rise as the process frees large blocks, so how often a
forward pass page-faults depends on what the process did before. Measured on ResNet-56 at
batch 32 (one thread): a fresh process page-faulted 8,000–16,000 times per dense pass, even
after 20 warm-up passes, and timed the dense model at 104–117 ms; the process that had just
pruned it, with a grown heap, had no faults and timed it at 88–92 ms. The pruned model,
with smaller activations, faulted far less, so the fresh process read a speed-up of 2.33–2.50
where the pruning process read 2.17–2.22 for the same two models.

`steady_allocator` sets both thresholds to the values glibc's own adjustment ends at (mmap
threshold at its 32 MiB cap, trim threshold twice that): a long-running process's state,
reached at once. Blocks under 32 MiB are then reused from the heap in every process; larger
ones are mapped afresh in every process alike. Set once per process and kept (glibc has no
way back to its adjusting mode): the cost is that up to 64 MiB of freed heap is kept rather
than returned to the system.
"""

import ctypes
import ctypes.util
import os
from functools import lru_cache

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # glibc sets trim = 2 x mmap when it raises the threshold
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")


@lru_cache(maxsize=1)
def steady_allocator() -> str:
    """Puts glibc's malloc in its steady state (once per process); says what was done.

    Returns a short note for the report: the thresholds set, or why nothing was set (not
    glibc, or the user chose the allocator's settings or another allocator through the
    environment, which is left alone).

    Example::

        steady_allocator()   # 'glibc mmap 32 MiB, trim 64 MiB'
        compare_latency(...)  # calls it itself; every timing in metaprune does
    """
    chosen = [name for name in _USER_SETTINGS if os.environ.get(name)]
    if chosen:
        return f"as set by {', '.join(chosen)}"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        return "not glibc: left as it is"
    if not (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return f"glibc {version}: mallopt refused, left as it is"
    return (f"glibc {version} mmap {MMAP_THRESHOLD >> 20} MiB, "
            f"trim {TRIM_THRESHOLD >> 20} MiB")
