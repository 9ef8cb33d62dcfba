"""One latency measurement at a time on this machine, across processes.

Two measurements running at once (two service jobs, two tune trials) slow each other down and
both report nonsense. Every measurement therefore holds an exclusive `fcntl.flock` on a file in
the cache folder; others wait for it. The lock dies with its process, so a crashed measurement
never leaves the machine locked.
"""

import fcntl
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from metaprune.data.cache import cache_dir

LOCK_NAME = "latency.lock"


def lock_path() -> Path:
    """The lock file: ``$METAPRUNE_CACHE/latency.lock`` (read on every call)."""
    return cache_dir() / LOCK_NAME


@contextmanager
def measurement_lock(progress: Callable[[str], None] | None = None, poll_s: float = 0.05):
    """Holds the machine-wide measurement lock for the duration of the block.

    Args:
        progress: told once, with the holder's pid, when the lock is busy and we wait.
        poll_s: how often a waiting process retries (a blocking flock could not report waiting).

    Example::

        with measurement_lock(progress=print):
            ...  # time the model; no other MetaPrune process is timing one now
    """
    path = lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if progress is not None and not told:
                    holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "?"
                    progress(f"latency: waiting for another measurement (pid {holder}) to finish")
                    told = True
                time.sleep(poll_s)
        os.ftruncate(handle, 0)
        os.pwrite(handle, str(os.getpid()).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(handle, 0)
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        os.close(handle)
