"""Latency on this machine: trustworthy timing, per-layer latency tables, the measurement lock.

Example::

    from metaprune.latency import compare_latency
    comparison = compare_latency([dense, pruned], (torch.randn(1, 3, 32, 32),), batch=1)
    comparison.speedups[1], comparison.spread(1)    # 1.93, {'before_ms': [...], ...}
"""

from metaprune.latency.allocator import allocator_note, steady_allocator
from metaprune.latency.layer_model import LayerTimes, measure_layer_times
from metaprune.latency.lock import measurement_lock
from metaprune.latency.machine import DEFAULT_THREADS, cpu_model, fixed_threads
from metaprune.latency.timing import LatencyComparison, compare_latency

__all__ = [
    "DEFAULT_THREADS",
    "LatencyComparison",
    "LayerTimes",
    "allocator_note",
    "compare_latency",
    "cpu_model",
    "fixed_threads",
    "measure_layer_times",
    "measurement_lock",
    "steady_allocator",
]
