"""Predicted latency of a pruned model, and the allocation that spends it.

`LatencyModel` turns per-group removal counts into a forward time: the kept fractions of every
layer (from the analytic `CostModel`) looked up in that layer's measured table
(`metaprune.latency.measure_layer_times`), plus the part of the dense model's measured time no
table accounts for (activations, adds, pooling, call overhead), which is assumed to shrink with
the tabled layers' output activations (the measured correction in `latency_target` fixes the
rest). `latency_allocation` walks a greedy knapsack path: with per-channel
loss estimates on one scale for every layer (`channel_value`, read from data), the chunk that
loses the least estimated loss per millisecond saved goes next (HALP's ranking). Without data
it is the global ranking corrected by measured time: channels go in order of importance divided
by how much more time per MAC they cost than the model's average (bounded), and a channel's
importance grows as its layer thins. A chunk's time is the marginal time of its layer at that
width, read as the slope of the measured curve over a span of about an eighth of the group
(a table measured at FRACTIONS can hold a step between two grid points, and the raw
difference would strip a layer in one go or never). With `round_to` the tables are measured at
every multiple, so their steps are real and a chunk's time is its own difference: a chunk
that saves nothing (an output width of 56 costs what 64 does where the CPU computes 16
channels at a time) waits until everything that saves time has gone, and kept widths land
where the time drops. On ResNet-56 at batch 64 (MACs 2.5x, `round_to=8`) the slope kept
last-stage inner widths of 40 (as slow as 48) and measured 1.70x; the chunks' own steps
measured 1.83-1.90x (taking the best of the next three chunks instead measured 1.74x:
tried, not kept). The walk takes a
chunk of a group at a time, since a chunk's time depends on the widths its neighbours have
reached. The path of count vectors it walks is a monotone family, so a MACs, params or
latency target is met by bisecting along it like any other allocation.

Depth pruning (`allocation="latency-depth"`): a group marked ``emptiable``
(`metaprune.pruning.depth`, a residual branch) has a second move besides its next chunk, all
its remaining channels at once. Its importance is the mean of what remains, thinned as if to
the group's floor (the last channels carry all the branch passes on; thinned only as the
width it leaves, the move emptied 2 of 3 blocks of a small ResNet and lost 14 points after
fine-tuning on the development models, against 1.8); its saving is every layer's time at width
0, which the tables price at 0 (the layers become `empty_layers.EmptyConv` / `nn.Identity`),
while the norm, add and activation after the branch stay (the untabled share follows the
consumer's output width, which stays). On ResNet-56 at batch 64 (MACs 2.5x, `round_to=8`) it
emptied every stage-1 block and 5 of stage 2 and measured 2.38x in a fresh process where the
latency allocation measured 1.89x (`benchmarks/latency.md`).
"""

import heapq
from collections.abc import Sequence

from metaprune.latency.layer_model import LayerTimes, table_total
from metaprune.pruning.allocation import Allocation
from metaprune.pruning.cost import CostModel
from metaprune.pruning.groups import ChannelGroup, removal_neighbours, snap_removal

_CHUNKS_PER_GROUP = 24  # the greedy path removes about 1/24 of a group at a time
_MAX_CORRECTION = 4.0  # time per MAC moves a channel's importance by at most this factor
_SMOOTHING_SHARE = 1 / 8  # a chunk's time is the slope of its layer's curve over this share


class LatencyModel:
    """Forward time (ms) of the model after removing channels, from per-layer tables.

    Args:
        cost: the model's analytic cost model (its removal orders set).
        tables: layer name -> measured `LayerTimes`.
        dense_ms: the dense model's measured latency; what the tables miss is kept constant,
            and the prediction is scaled so the dense model predicts exactly this.
        multiple: the `round_to` the tables were measured at (every multiple of it, so their
            steps are real), or None (a coarse grid, interpolated).

    Example::

        latency = LatencyModel(cost, measure_layer_times(model, inputs, cost.units), dense_ms=3.2)
        latency.predict([0] * len(cost.groups))   # 3.2
    """

    def __init__(self, cost: CostModel, tables: dict[str, LayerTimes], dense_ms: float,
                 multiple: int | None = None) -> None:
        self.cost = cost
        self.multiple = multiple
        self.tables = {name: table for name, table in tables.items() if name in cost.units}
        tabled = table_total(self.tables)
        self.untabled_ms = max(0.0, dense_ms - tabled)
        self.scale = dense_ms / (self.untabled_ms + tabled) if tabled > 0 else 1.0
        self.dense_ms = dense_ms
        activations = sum(t.activations for t in self.tables.values())
        # untabled time per output element of a tabled layer (0: it stays constant)
        self.ms_per_activation = self.untabled_ms / activations if activations else 0.0
        self.fixed_ms = 0.0 if activations else self.untabled_ms

    def unit_ms(self, name: str, removed_in: float, removed_out: float) -> float:
        """Scaled time of one layer with that many input and output channels removed."""
        table = self.tables.get(name)
        if table is None:
            return 0.0
        return self._layer_ms(table, *self.cost.units[name].keeps(removed_in, removed_out))

    def _layer_ms(self, table: LayerTimes, keep_in: float, keep_out: float) -> float:
        own = table.at(keep_in, keep_out)
        return self.scale * (own + self.ms_per_activation * table.activations * keep_out)

    def predict(self, removed: Sequence[int]) -> float:
        """Predicted latency (ms) when group i loses its first `removed[i]` channels."""
        keeps = self.cost.unit_keeps(removed)
        layers = sum(self._layer_ms(table, *keeps[name]) for name, table in self.tables.items())
        return self.scale * self.fixed_ms + layers


class _GreedyState:
    """Removed input/output channels per layer while the greedy path is walked."""

    def __init__(self, latency: LatencyModel) -> None:
        self.latency = latency
        self.cumulative = latency.cost._cumulative
        self.removed = {name: [0.0, 0.0] for name in latency.cost.units}  # [in, out]

    def changes(self, group_index: int, old: int, new: int) -> dict[str, tuple[float, float]]:
        """Layer -> (extra removed inputs, extra removed outputs) when a group goes old -> new
        (negative when new < old)."""
        delta: dict[str, list[float]] = {}
        for unit, side, cumulative in self.cumulative[group_index]:
            entry = delta.setdefault(unit, [0.0, 0.0])
            entry[0 if side == "in" else 1] += float(cumulative[new] - cumulative[old])
        return {unit: (d[0], d[1]) for unit, d in delta.items()}

    def cost_at(self, group_index: int, now: int, count: int) -> tuple[float, float]:
        """(ms, MACs) of the group's layers if it had `count` removed instead of `now`."""
        time, macs = 0.0, 0.0
        for unit, (extra_in, extra_out) in self.changes(group_index, now, count).items():
            removed_in, removed_out = self.removed[unit]
            time += self.latency.unit_ms(unit, removed_in + extra_in, removed_out + extra_out)
            cost = self.latency.cost.units[unit]
            macs += cost.macs_at(*cost.keeps(removed_in + extra_in, removed_out + extra_out))
        return time, macs

    def saving(self, group_index: int, now: int, new: int, limit: int,
               span: int) -> tuple[float, float]:
        """(ms, MACs) going from `now` to `new` removed saves, at the slope of the group's
        curves over `span` channels either side (the marginal cost, not one step's jump)."""
        low, high = max(0, now - span), min(limit, new + span)
        time_low, macs_low = self.cost_at(group_index, now, low)
        time_high, macs_high = self.cost_at(group_index, now, high)
        share = (new - now) / max(high - low, 1)
        return (time_low - time_high) * share, (macs_low - macs_high) * share

    def apply(self, changes: dict) -> None:
        for unit, (extra_in, extra_out) in changes.items():
            self.removed[unit][0] += extra_in
            self.removed[unit][1] += extra_out


def _next_removal(count: int, group: ChannelGroup, limit: int) -> int | None:
    chunk = max(1, round(group.size / _CHUNKS_PER_GROUP))
    target = snap_removal(count + chunk, group.size, group.step, limit)
    if target > count:
        return target
    above = [r for r in removal_neighbours(count, group.size, group.step, limit) if r > count]
    return above[0] if above else None


def latency_allocation(groups: list[ChannelGroup], keys: list, latency: LatencyModel,
                       time_weight: float = 1.0, thinning: bool = True) -> Allocation:
    """Removal counts along a greedy path: least importance per relative time-per-MAC first.

    Args:
        groups: the model's channel groups (blocked ones are never pruned).
        keys: per group, the non-decreasing importance keys from `removal_order`.
        latency: the model's `LatencyModel` (its cost model's removal orders set).
        time_weight: how strongly measured time reorders the importance ranking (the bounded
            time-per-MAC factor is raised to this power; 0: the global ranking's order).
        thinning: whether a channel's importance grows as its layer thins.

    Example::

        allocation = latency_allocation(groups, keys, latency)
        counts = allocation.counts(allocation.high / 2)   # halfway along the path
    """
    path: list[tuple[int, ...]] = []

    def counts_at(theta, group, group_keys, max_removed):
        return path[min(int(theta), len(path) - 1)][position[id(group)]]

    position = {id(group): index for index, group in enumerate(groups)}
    allocation = Allocation(groups, keys, counts_at, 0.0, 0.0)
    state = _GreedyState(latency)
    sharing: dict[str, set[int]] = {}
    for index, uses in enumerate(state.cumulative):
        for unit, _side, _cumulative in uses:
            sharing.setdefault(unit, set()).add(index)
    counts = [0] * len(groups)
    versions = [0] * len(groups)
    heap: list = []

    def push(index: int) -> None:
        group = groups[index]
        if group.blocked or keys[index] is None:
            return
        now = counts[index]
        new = _next_removal(now, group, allocation.max_removed[index])
        if new is not None:
            # tables at every round_to multiple hold the real steps: the chunk's own difference
            span = 0 if stepped else max(group.step, round(group.size * _SMOOTHING_SHARE))
            candidate(index, now, new, allocation.max_removed[index], span,
                      group.size / (group.size - new))
        if group.emptiable and now < group.size:
            # depth pruning: the whole group at once; its last channels carry all it passes
            # on, so they count as thinned to the floor (the most any chunk is thinned); the
            # time saved is all its layers' time (0 at width 0)
            floor = group.size - allocation.max_removed[index]
            candidate(index, now, group.size, group.size, 0, group.size / floor)

    def candidate(index: int, now: int, new: int, limit: int, span: int,
                  thinned: float) -> None:
        saving, macs = state.saving(index, now, new, limit, span)
        # the last channels of a layer carry all it passes on: importance grows as it thins
        importance = float(keys[index][now:new].clamp(min=0).mean())
        if thinning:
            importance *= thinned
        # time per MAC of this chunk, relative to the dense model's: 1 where MACs tell the
        # truth; bounded, so time reorders the importance ranking but never overrules it
        relative = min(max(saving / max(macs, 1.0) / time_per_mac, 1 / _MAX_CORRECTION),
                       _MAX_CORRECTION)
        priority = importance / relative ** time_weight if saving > 1e-9 else float("inf")
        # ties (e.g. equal importance) go to the bigger saving, then the lower index
        heapq.heappush(heap, (priority, -saving, index, versions[index], new))

    stepped = bool(latency.multiple and latency.multiple > 1)

    dense = [0] * len(groups)
    time_per_mac = latency.predict(dense) / max(latency.cost.evaluate(dense)[0], 1.0)
    for index in range(len(groups)):
        push(index)
    path.append(tuple(counts))
    while heap:
        _priority, _saving, index, version, new = heapq.heappop(heap)
        if version != versions[index]:
            continue
        state.apply(state.changes(index, counts[index], new))
        counts[index] = new
        path.append(tuple(counts))
        touched = {other for unit, _side, _c in state.cumulative[index]
                   for other in sharing.get(unit, ())}
        for other in touched:
            versions[other] += 1
            push(other)
    allocation.high = float(len(path) - 1)
    return allocation
