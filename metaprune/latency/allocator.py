"""The C allocator's steady state, so a latency does not depend on the process's history.

glibc's malloc serves a large block (over its mmap threshold) with fresh pages and returns
freed memory at the top of its heap to the system once more than the trim threshold is free.
Both thresholds start at 128 KiB and rise as the process frees large blocks, so how often a
forward pass page-faults depends on what the process did before, not on the model:

- ResNet-56 at batch 32 (one thread): a fresh process page-faulted 8,000–16,000 times per
  dense pass, even after 20 warm-up passes, and timed the dense model at 104–117 ms; the
  process that had just pruned it had no faults and timed it at 88–92 ms. The pruned model,
  with smaller activations, faulted far less, so the fresh process read a speed-up of
  2.33–2.50 where the pruning process read 2.17–2.22 for the same two models.
- MobileNetV2 at batch 1, thresholds fixed at glibc's final values (32 MiB, 64 MiB): while
  `prune` ran, the dense reference faulted 16,600 times per pass (74 ms; its pass's memory
  sat at the top of a heap full of pruning state and went back to the system each time);
  the same model in the same process after `prune` returned: 0 faults, 57 ms.

- MobileNetV2 at batch 32: its largest activations (up to 154 MB) are over any mmap threshold,
  so every pass mapped them afresh in every process: about 3 million faults per dense pass
  (7.2 s against 2.6 s with nothing mapped). The dense model paid more of them than the pruned
  one, so a speed-up read 2.02 in the pruning process and 1.87 in a fresh one.

`steady_allocator` fixes the mmap threshold at 32 MiB, glibc's own ceiling (once per process:
glibc has no way back to its adjusting mode), and, while a measurement runs, maps no block at
all (every block comes from the heap) and lets no memory go back to the system; afterwards
mapping is allowed again and the trim threshold returns to 64 MiB (twice the mmap threshold,
glibc's own rule), so a long-running service does not keep what a measurement freed.
"""

import ctypes
import ctypes.util
import os
from contextlib import contextmanager
from functools import lru_cache

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_MMAP_MAX_DEFAULT = 65536  # glibc's DEFAULT_MMAP_MAX
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # between measurements: glibc's trim = 2 x mmap rule
_NO_TRIM = 2**31 - 1  # while measuring: mallopt takes an int; 2 GiB is "never" for one pass
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_",
                  "LD_PRELOAD")
_depth = 0  # nested measurements restore the trim threshold once, at the outermost exit


@lru_cache(maxsize=1)
def _glibc():
    """(libc or None, the report's note); fixes the mmap threshold the first time."""
    chosen = [name for name in _USER_SETTINGS if os.environ.get(name)]
    if chosen:
        return None, f"as set by {', '.join(chosen)}"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        return None, "not glibc: left as it is"
    if not (libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)):
        return None, f"glibc {version}: mallopt refused, left as it is"
    return libc, (f"glibc {version} mmap {MMAP_THRESHOLD >> 20} MiB, no mmap and no trim "
                  f"while timing (trim {TRIM_THRESHOLD >> 20} MiB otherwise)")


def allocator_note() -> str:
    """What `steady_allocator` does on this machine, as the report records it."""
    return _glibc()[1]


@contextmanager
def steady_allocator():
    """Runs the block (a measurement) with glibc's malloc in its steady state; yields the note.

    Left alone when the allocator is not glibc, or when the environment chose its settings
    or another allocator (the note says so).

    Example::

        with steady_allocator() as note:   # "glibc 2.36 mmap 32 MiB, no mmap and no trim ..."'
            time_the_model()
        compare_latency(...)                # does this itself; so do the layer tables
    """
    global _depth
    libc, note = _glibc()
    if libc is None:
        yield note
        return
    _depth += 1
    libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM)
    libc.mallopt(_M_MMAP_MAX, 0)  # activations over 32 MiB come from the heap, not fresh pages
    try:
        yield note
    finally:
        _depth -= 1
        if _depth == 0:
            libc.mallopt(_M_MMAP_MAX, _MMAP_MAX_DEFAULT)
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
