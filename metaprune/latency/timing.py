"""Latency you can trust on a busy CPU: warm-up, interleaved repeats, medians with spread.

Several models are timed in rounds: every round runs each model once (alternating the order
between rounds), so a burst of load from another process hits them all alike, and the speed-up
of model i over model 0 is the median of the per-round ratios rather than a ratio of medians
taken minutes apart. Timing runs on a fixed number of torch threads, under the machine-wide
measurement lock, inside a time budget: the number of rounds is whatever fits.
"""

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from metaprune.latency.allocator import steady_allocator
from metaprune.latency.lock import measurement_lock
from metaprune.latency.machine import DEFAULT_THREADS, cpu_model, fixed_threads
from metaprune.measure import _at_batch

_MIN_SAMPLE_MS = 2.0  # a timed sample repeats tiny models' forward passes until it lasts this long
_PROGRESS_EVERY_S = 1.0


@dataclass
class LatencyComparison:
    """Latencies of several models measured together (model 0 is the reference).

    Attributes:
        median_ms: per model, the median forward time in milliseconds.
        quartiles_ms: per model, the 25th and 75th percentile of its samples.
        speedups: per model, the median over rounds of (model 0 time / this model's time).
        speedup_quartiles: per model, the quartiles of those per-round ratios.
        batch, threads, cpu, clock: where and how it was measured (`clock_for`).
        allocator: the C allocator's settings while timing (`steady_allocator`).
        rounds: samples per model; seconds: wall time of the whole measurement.
    """

    median_ms: list[float]
    quartiles_ms: list[tuple[float, float]]
    speedups: list[float]
    speedup_quartiles: list[tuple[float, float]]
    batch: int
    threads: int
    cpu: str
    rounds: int
    seconds: float
    samples_ms: list[list[float]] = field(repr=False, default_factory=list)
    clock: str = "wall"
    allocator: str = ""

    def pooled(self, other: "LatencyComparison") -> "LatencyComparison":
        """This measurement and another of the same models, as one with all their rounds."""
        samples = [a + b for a, b in zip(self.samples_ms, other.samples_ms)]
        return _summarise(samples, self.batch, self.threads, self.rounds + other.rounds,
                          self.seconds + other.seconds, self.clock, self.cpu, self.allocator)

    def spread(self, index: int) -> dict:
        """The report's spread of model `index` against model 0: quartiles and rounds."""
        return {
            "before_ms": [round(v, 4) for v in self.quartiles_ms[0]],
            "after_ms": [round(v, 4) for v in self.quartiles_ms[index]],
            "speedup": [round(v, 4) for v in self.speedup_quartiles[index]],
            "rounds": self.rounds,
            "clock": self.clock,
            "allocator": self.allocator,
        }


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (math.nan, math.nan)
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def clock_for(threads: int, clock: str = "auto") -> tuple[str, Callable[[], float]]:
    """(name, function) of the clock a measurement reads.

    "auto" reads the calling thread's CPU time when torch runs on one thread (its ops then run
    in this thread, and time spent descheduled by other processes is not counted: on a loaded
    machine this is the latency the model would have on an idle one), else the wall clock.
    """
    if clock == "auto":
        clock = "thread_cpu" if int(threads) == 1 else "wall"
    if clock == "thread_cpu":
        return clock, time.thread_time
    if clock == "wall":
        return clock, time.perf_counter
    raise ValueError(f"clock must be 'auto', 'thread_cpu' or 'wall', got {clock!r}")


def _time_once(module: nn.Module, inputs: tuple, inner: int,
               clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    for _ in range(inner):
        module(*inputs)
    return (clock() - start) * 1000.0 / inner


@torch.no_grad()
def compare_latency(
    models: Sequence[nn.Module],
    example_inputs: Sequence[torch.Tensor],
    *,
    batch: int = 1,
    threads: int = DEFAULT_THREADS,
    budget_s: float = 4.0,
    min_rounds: int = 3,
    max_rounds: int = 60,
    clock: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> LatencyComparison:
    """Times `models` interleaved on the CPU and returns medians, spreads and paired speed-ups.

    Args:
        models: modules taking the same inputs; model 0 is the reference of `speedups`.
        example_inputs: one forward pass's inputs; row 0 is repeated to `batch` rows.
        batch: rows per timed forward pass.
        threads: torch intra-op threads while timing (restored afterwards).
        budget_s: wall-time budget; rounds stop when it is spent (after `min_rounds`).
        min_rounds, max_rounds: bounds on the samples per model.
        clock: "auto", "thread_cpu" or "wall" (see `clock_for`).
        progress: called with a short line about once a second (and when waiting for the lock).

    Example::

        comparison = compare_latency([dense, pruned], (torch.randn(1, 3, 32, 32),), batch=1)
        comparison.median_ms      # [3.1, 1.6]
        comparison.speedups[1]    # 1.94: median of per-round dense/pruned ratios
    """
    if not models:
        raise ValueError("compare_latency needs at least one model")
    if int(batch) < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    inputs = _at_batch(example_inputs, int(batch))
    clock_name, read_clock = clock_for(threads, clock)
    modes = [m.training for m in models]
    for module in models:
        module.eval()
    started = time.perf_counter()
    try:
        # the allocator: else a process page-faults on every pass where another does not
        with measurement_lock(progress), fixed_threads(threads), \
                steady_allocator() as allocator:
            locked_at = time.perf_counter()
            # Warm-up: the first pass allocates buffers and builds kernels; the second estimates
            # the time of one pass, which sizes the inner repeats and the number of rounds.
            estimates = []
            for module in models:
                module(*inputs)
                estimates.append(max(_time_once(module, inputs, 1), 1e-3))  # wall: sizes the budget
            inner = [max(1, math.ceil(_MIN_SAMPLE_MS / e)) for e in estimates]
            per_round_s = sum(i * e for i, e in zip(inner, estimates)) / 1000.0
            remaining = budget_s - (time.perf_counter() - locked_at)
            rounds = int(min(max_rounds, max(min_rounds, remaining // max(per_round_s, 1e-6))))
            samples: list[list[float]] = [[] for _ in models]
            told = time.perf_counter()
            for round_index in range(rounds):
                order = range(len(models)) if round_index % 2 == 0 else reversed(range(len(models)))
                for index in order:
                    samples[index].append(_time_once(models[index], inputs, inner[index],
                                                     read_clock))
                if progress is not None and time.perf_counter() - told > _PROGRESS_EVERY_S:
                    progress(f"latency: round {round_index + 1}/{rounds} at batch {batch}")
                    told = time.perf_counter()
    finally:
        for module, mode in zip(models, modes):
            module.train(mode)
    return _summarise(samples, int(batch), int(threads), rounds, time.perf_counter() - started,
                      clock_name, allocator=allocator)


def _summarise(samples: list[list[float]], batch: int, threads: int, rounds: int,
               seconds: float, clock: str, cpu: str | None = None,
               allocator: str = "") -> LatencyComparison:
    ratios = [[a / b for a, b in zip(samples[0], s)] for s in samples]
    return LatencyComparison(
        median_ms=[statistics.median(s) for s in samples],
        quartiles_ms=[_quartiles(s) for s in samples],
        speedups=[statistics.median(r) for r in ratios],
        speedup_quartiles=[_quartiles(r) for r in ratios],
        batch=batch, threads=threads, cpu=cpu or cpu_model(), rounds=rounds, seconds=seconds,
        samples_ms=samples, clock=clock, allocator=allocator,
    )
