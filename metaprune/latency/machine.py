"""The machine a latency figure belongs to: CPU model and a fixed torch thread count.

A latency is only comparable with another taken on the same CPU with the same number of
threads, so both are recorded in every report and key every cached latency model.
"""

import platform
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

DEFAULT_THREADS = 1  # one intra-op thread: stable on a shared machine, and what most edge boxes run


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows).

    Example::

        cpu_model()   # 'Intel(R) Xeon(R) Processor'
    """
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


@contextmanager
def fixed_threads(threads: int):
    """Runs the block with exactly `threads` torch intra-op threads, then restores the old count.

    Example::

        with fixed_threads(1):
            model(x)          # timed on one thread whatever the caller had set
    """
    if int(threads) < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield int(threads)
    finally:
        torch.set_num_threads(previous)
