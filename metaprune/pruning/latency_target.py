"""Pruning to a measured latency speed-up, and the report's latency figures.

The target is met in two stages. The per-layer latency model predicts the counts that should
give the speed-up (aiming a little above it, since the window is [0.95 X, 1.1 X]); the pruned
model is then timed against the dense one, interleaved, and when the measured speed-up falls
outside the window the model's goal is corrected by the ratio measured / predicted and the
model pruned again from the dense copy. The last measurement is the report's.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from metaprune.errors import InvalidTargetError
from metaprune.latency.layer_model import measure_layer_times
from metaprune.latency.machine import DEFAULT_THREADS
from metaprune.latency.timing import LatencyComparison, compare_latency
from metaprune.pruning.allocation import Allocation
from metaprune.pruning.cost import CostModel
from metaprune.pruning.latency_cost import LatencyModel
from metaprune.pruning.targets import Target, solve_counts

log = logging.getLogger("metaprune.latency")

WINDOW = (0.95, 1.1)  # measured latency speed-up / target counts as reached inside this window
_AIM = 1.02  # the first prediction aims here, inside the window with room for noise both ways
_MAX_CORRECTIONS = 3
REPORT_BUDGET_S = 6.0  # the report's own interleaved measurement (ResNet-50 at batch 1: < 10 s)
_DENSE_BUDGET_S = 2.0


@dataclass(frozen=True)
class LatencySettings:
    """How latency is measured for one prune: batch, threads, and where progress goes."""

    batch: int = 1
    threads: int = DEFAULT_THREADS
    progress: Callable[[str], None] | None = log.info


def build_latency_model(work: nn.Module, example_inputs: Sequence[torch.Tensor], cost: CostModel,
                        settings: LatencySettings) -> LatencyModel:
    """Measures (or reads from the cache) every prunable layer's table and the dense latency."""
    tables = measure_layer_times(work, example_inputs, list(cost.units), batch=settings.batch,
                                 threads=settings.threads, progress=settings.progress)
    dense = compare_latency([work], example_inputs, batch=settings.batch, threads=settings.threads,
                            budget_s=_DENSE_BUDGET_S, progress=settings.progress)
    return LatencyModel(cost, tables, dense.median_ms[0])


def measure_report_latency(dense: nn.Module, pruned: nn.Module,
                           example_inputs: Sequence[torch.Tensor],
                           settings: LatencySettings) -> LatencyComparison:
    """The report's latency: dense and pruned timed interleaved within `REPORT_BUDGET_S`."""
    return compare_latency([dense, pruned], example_inputs, batch=settings.batch,
                           threads=settings.threads, budget_s=REPORT_BUDGET_S,
                           progress=settings.progress)


def latency_report(comparison: LatencyComparison | None) -> dict:
    """The report's latency keys (DESIGN §6) from a dense-vs-pruned comparison, or nulls."""
    if comparison is None:
        return {"latency_ms_before": None, "latency_ms_after": None, "latency_speedup": None,
                "latency_batch": None, "latency_threads": None, "latency_spread": None,
                "cpu": None}
    return {
        "latency_ms_before": comparison.median_ms[0],
        "latency_ms_after": comparison.median_ms[1],
        "latency_speedup": comparison.speedups[1],
        "latency_batch": comparison.batch,
        "latency_threads": comparison.threads,
        "latency_spread": comparison.spread(1),
        "cpu": comparison.cpu,
    }


def in_window(measured: float, target: float) -> bool:
    return WINDOW[0] * target <= measured <= WINDOW[1] * target


def prune_to_latency(allocation: Allocation, cost: CostModel, latency: LatencyModel,
                     target: Target, remove: Callable[[list[int]], nn.Module],
                     measure: Callable[[nn.Module], LatencyComparison],
                     progress: Callable[[str], None] | None = None,
                     ) -> tuple[nn.Module, LatencyComparison, dict]:
    """A pruned model whose measured latency speed-up over the dense one is in the window.

    Args:
        allocation: the allocation family bisected along.
        cost, latency: the model's analytic cost and latency models.
        target: a `latency_speedup` target.
        remove: counts -> physically pruned (and checked) model.
        measure: pruned model -> its comparison with the dense model (e.g.
            `measure_report_latency` with the dense model bound).
        progress: told the predicted and measured speed-up of every attempt.

    Returns:
        (pruned model, its final measurement against `dense`, a note for the report: the
        attempts, each with predicted and measured speed-up, and whether the window was met).
    """
    dense_predicted = latency.predict([0] * len(allocation.groups))
    aim = target.value * _AIM
    attempts, best = [], None
    for _ in range(_MAX_CORRECTIONS + 1):
        try:
            counts = solve_counts(allocation, cost, target, dense_predicted / aim,
                                  evaluate=latency.predict)
        except InvalidTargetError:
            if not attempts:
                raise
            counts = allocation.counts(allocation.high)  # a correction asked past the floor

        predicted = dense_predicted / latency.predict(counts)
        pruned = remove(counts)
        comparison = measure(pruned)
        measured = comparison.speedups[1]
        attempts.append({"predicted": round(predicted, 4), "measured": round(measured, 4)})
        if progress is not None:
            progress(f"latency target {target.value:g}x: predicted {predicted:.3f}x, "
                              f"measured {measured:.3f}x")
        miss = abs(measured / target.value - 1.0)
        if best is None or miss < best[2]:
            best = (pruned, comparison, miss)
        if in_window(measured, target.value):
            break
        # The model was off by measured / predicted here; ask it for proportionally more (less).
        aim = aim * target.value * _AIM / measured
    pruned, comparison, _miss = best
    reached = in_window(comparison.speedups[1], target.value)
    note = {"kind": "latency_speedup", "value": target.value,
            "achieved": comparison.speedups[1], "reached": reached, "attempts": attempts}
    if not reached:
        note["why"] = (f"the measured speed-up stayed outside [{WINDOW[0]:g}, {WINDOW[1]:g}] x "
                       f"the target after {len(attempts)} measurements (see attempts; a loaded "
                       "machine or a model at its pruning floor)")
    return pruned, comparison, note
