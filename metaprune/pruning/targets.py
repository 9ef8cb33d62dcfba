"""Targets (speed-up or params ratio) and the bisection that meets them analytically."""

from collections.abc import Callable
from dataclasses import dataclass

from metaprune.errors import InvalidTargetError
from metaprune.pruning.allocation import MIN_KEEP_FRACTION, Allocation
from metaprune.pruning.cost import CostModel
from metaprune.pruning.groups import removal_neighbours
from metaprune.vocabulary import TOLERANCE, check_params_ratio, check_speedup


@dataclass(frozen=True)
class Target:
    """A target: `kind` is "speedup" (MACs before / after), "params_ratio" (after / before) or
    "latency_speedup" (measured latency before / after)."""

    kind: str
    value: float

    @classmethod
    def from_arguments(cls, speedup: float | None, params_ratio: float | None,
                       latency_speedup: float | None = None) -> "Target | None":
        """The one target given, its bounds checked by `metaprune.vocabulary`."""
        given = [n for n, v in (("speedup", speedup), ("params_ratio", params_ratio),
                                ("latency_speedup", latency_speedup)) if v is not None]
        if len(given) > 1:
            raise InvalidTargetError(f"give at most one target, not both {given[0]} and "
                                     f"{given[1]}")
        if latency_speedup is not None:
            return cls("latency_speedup", check_speedup(latency_speedup, "latency_speedup"))
        if speedup is not None:
            return cls("speedup", check_speedup(speedup))
        if params_ratio is not None:
            return cls("params_ratio", check_params_ratio(params_ratio))
        return None

    def achieved(self, macs_before, macs_after, params_before, params_after) -> float:
        if self.kind == "speedup":
            return macs_before / max(macs_after, 1e-12)
        return params_after / params_before

    def error(self, achieved: float) -> float:
        """Relative miss |achieved / target - 1|."""
        return abs(achieved / self.value - 1.0)

    def goal(self, cost: CostModel) -> float:
        """The MACs or params the pruned model should have."""
        if self.kind == "speedup":
            return cost.macs_before / self.value
        return cost.params_before * self.value


def solve_counts(allocation: Allocation, cost: CostModel, target: Target, goal: float,
                 iterations: int = 60, evaluate: Callable[[list[int]], float] | None = None,
                 ) -> list[int]:
    """Removal counts whose analytic MACs (or params) are closest to `goal`.

    Bisects the allocation parameter: cost falls as it grows. Raises InvalidTargetError when
    even pruning every group to its floor does not get there. `evaluate` replaces the analytic
    count (e.g. a predicted latency): counts -> the quantity `goal` is in.
    """
    index = 0 if target.kind == "speedup" else 1
    if evaluate is None:
        def evaluate(counts):
            return cost.evaluate(counts)[index]

    def quantity(theta: float) -> tuple[float, list[int]]:
        counts = allocation.counts(theta)
        return evaluate(counts), counts

    floor_value, floor_counts = quantity(allocation.high)
    if floor_value > goal * (1.0 + TOLERANCE):
        if target.kind == "latency_speedup":
            best = evaluate([0] * len(allocation.groups)) / floor_value
        else:
            best = target.achieved(cost.macs_before, floor_value, cost.params_before,
                                   floor_value)
        raise InvalidTargetError(
            f"{target.kind} {target.value:g} cannot be reached: keeping at least "
            f"{MIN_KEEP_FRACTION:.0%} of every prunable layer's channels (and all channels of "
            f"the input and output layers) allows at most {best:.3g}"
        )
    low, high = allocation.low, allocation.high
    best_counts, best_miss = floor_counts, abs(floor_value / goal - 1.0)
    for _ in range(iterations):
        middle = (low + high) / 2
        value, counts = quantity(middle)
        miss = abs(value / goal - 1.0)
        if miss < best_miss:
            best_counts, best_miss = counts, miss
        if value > goal:
            low = middle
        else:
            high = middle
    return _refine(best_counts, allocation, evaluate, goal)


def _moves(counts: list[int], allocation: Allocation, pairs: bool, siblings: list[list[int]]):
    """Count vectors one step (or, with `pairs`, one step up here and one down there) away;
    each set of `siblings` (positions) moves together."""
    steps = []
    for positions in siblings:
        group, first = allocation.groups[positions[0]], positions[0]
        for moved in removal_neighbours(counts[first], group.size, group.step,
                                        allocation.max_removed[first]):
            steps.append((positions, moved - counts[first]))
    for positions, change in steps:
        yield {position: change for position in positions}
    if pairs:
        for index, (first, change) in enumerate(steps):
            for second, other in steps[index + 1:]:
                if (change > 0) != (other > 0):
                    yield {**{p: change for p in first}, **{p: other for p in second}}


def _refine(counts: list[int], allocation: Allocation, evaluate: Callable[[list[int]], float],
            goal: float, max_moves: int = 32) -> list[int]:
    """Closes the last gap left by coarse steps: moves one group by one step at a time.

    Wide coupled groups (a transformer's residual width, removed a head's worth at a time) can
    make the threshold jump past the goal; nudging the groups nearest their own threshold lands
    within a fraction of a percent. When single steps are all too coarse (small models), one
    group gives a step back while another takes one. An allocation with siblings (uniform)
    moves each set of siblings together, and only where that cannot reach the tolerance are
    groups moved alone.
    """
    alone = [[p] for p, g in enumerate(allocation.groups) if not g.blocked]
    if allocation.siblings is not None:
        counts = _nudge(counts, allocation, evaluate, goal, max_moves, allocation.siblings)
        if abs(evaluate(counts) / goal - 1.0) <= TOLERANCE / 4:
            return counts
    return _nudge(counts, allocation, evaluate, goal, max_moves, alone)


def _nudge(counts, allocation, evaluate, goal, max_moves, siblings) -> list[int]:
    counts = list(counts)
    miss = abs(evaluate(counts) / goal - 1.0)
    for _ in range(max_moves):
        if miss <= TOLERANCE / 8:
            break
        best_counts, best_miss = None, miss
        pairs = miss > TOLERANCE / 2 and len(siblings) <= 64
        for move in _moves(counts, allocation, pairs, siblings):
            trial = list(counts)
            for position, change in move.items():
                trial[position] += change
            trial_miss = abs(evaluate(trial) / goal - 1.0)
            if trial_miss < best_miss:
                best_counts, best_miss = trial, trial_miss
        if best_counts is None:
            break
        counts, miss = best_counts, best_miss
    return counts
