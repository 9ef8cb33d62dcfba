"""Measured per-group damage, and the allocation that removes MACs where they hurt least.

For every prunable channel group, the group alone loses a few fractions of its channels (in
the criterion's order, as the engine removes them), BatchNorm statistics are re-estimated on a
few training batches and the cross-entropy is read on others (`metanet_choice`'s forward-only
protocol). The loss increase over the dense model, recalibrated the same way, is the group's
damage at that fraction. `damage_policy` then spends a MACs target on the groups with the least
damage per MAC saved. Forward passes only: no optimiser step, never the test data.

Two users: `prune(method="metanet")` offers the measured allocation of the model being pruned
as a candidate beside the sparsity head's (`metanet_choice`), and `metaprune metanet
damage-labels` measures corpus training models to train the head on (`training/damage_labels`).

Example::

    from metaprune.pruning.damage import damage_policy, measure_model_damage

    measurement = measure_model_damage(model, example_inputs, train_loader)
    policy = damage_policy(measurement, speedup=3.0)   # group root -> keep ratio
    prune(model, example_inputs, policy=policy, speedup=3.0)
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from metaprune.errors import MetaPruneError

# shares of a group's channels removed, one try each (the corpus labels' fractions)
FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
# measurements of the last few (model, order, batches) kept: the measurement does not depend on
# the target, so pruning one model to several targets (or a benchmark's rows) measures it once
_CACHE: OrderedDict[str, dict] = OrderedDict()
_CACHE_SIZE = 4
# Seconds `prune(method="metanet")` lets the live measurement take, estimated before it starts
# as (trials) x (one recalibrated loss of the dense model). The held-out benchmark's models need
# 1-10 s; a ResNet-50 at 224^2 with batches of 16 would need over an hour (~50 groups x 7
# fractions x 12 batches), so there the measured candidates are dropped and the report says so.
MEASUREMENT_BUDGET_S = 120.0


class MeasurementOverBudget(MetaPruneError):
    """The live damage measurement would take longer than its budget (estimated up front)."""


def check_measurement_budget(groups, fractions: Sequence[float], one_loss_s: float,
                             budget_s: float | None) -> None:
    """Raise `MeasurementOverBudget` when measuring every unblocked group at every fraction,
    each try costing at least one recalibrated loss (`one_loss_s`), would exceed `budget_s`
    (None: no budget, as for the corpus labels)."""
    trials = sum(not group.blocked for group in groups) * len(fractions)
    estimate = trials * one_loss_s
    if budget_s is not None and estimate > budget_s:
        raise MeasurementOverBudget(
            f"the measured allocation was skipped: {trials} tries x {one_loss_s:.2f} s per "
            f"recalibrated loss = at least {estimate:.0f} s, over its {budget_s:.0f} s budget")


def measure_damage(groups, *, counts_for: Callable[[int, float], list[int] | None],
                   remove: Callable[[list[int]], nn.Module],
                   macs_of: Callable[[list[int]], float],
                   loss_of: Callable[[nn.Module], float], dense_loss: float,
                   fractions: Sequence[float] = FRACTIONS) -> dict:
    """Loss increase and MACs saved when each prunable group alone loses each fraction.

    Args:
        groups: the model's channel groups (blocked ones are skipped).
        counts_for: (group index, fraction) -> removal counts of every group with only that
            group pruned (None: the engine cannot prune it so).
        remove: counts -> a pruned copy of the dense model.
        macs_of: counts -> the pruned model's MACs.
        loss_of: pruned model -> its loss after BatchNorm re-estimation.
        dense_loss: the dense model's loss, measured the same way.
        fractions: shares of a group's channels to remove, one try each.

    Returns ``{"dense_loss", "macs", "groups": [{"root", "size", "fraction", "damage",
    "macs_saved"}]}``: per group the fractions that removed channels (floors and channel
    steps may merge two), the loss increase (clamped at 0, non-decreasing) and MACs saved.
    """
    macs = float(macs_of([0] * len(groups)))
    measured = []
    for index, group in enumerate(groups):
        if group.blocked:
            continue
        curve = {"root": group.root, "size": group.size, "fraction": [], "damage": [],
                 "macs_saved": []}
        for fraction in sorted(fractions):
            counts = counts_for(index, fraction)
            if counts is None or counts[index] == 0:
                continue
            saved = macs - float(macs_of(counts))
            if saved <= (curve["macs_saved"][-1] if curve["macs_saved"] else 0.0):
                continue  # the floor or the channel step gave the same widths again
            try:
                loss = loss_of(remove(counts))  # removal traces with autograd: no no_grad here
            except MetaPruneError:
                continue  # e.g. a removal that breaks a block's shapes: left unmeasured
            damage = max(loss - dense_loss, 0.0, curve["damage"][-1] if curve["damage"] else 0.0)
            curve["fraction"].append(float(fraction))
            curve["damage"].append(damage)
            curve["macs_saved"].append(saved)
        if curve["fraction"]:
            measured.append(curve)
    return {"dense_loss": dense_loss, "macs": macs, "groups": measured}


def fingerprint(model: nn.Module, orders: Sequence[torch.Tensor], batches,
                fractions: Sequence[float], blocked: Sequence[bool]) -> str:
    """What a measurement depends on: the weights, the removal orders, the batches, the
    fractions and which groups are blocked (a cache key; equal keys, equal measurements)."""
    digest = hashlib.sha256(repr((tuple(fractions), tuple(blocked))).encode())
    tensors = [*model.state_dict().values(), *orders,
               *(tensor for batch in batches for tensor in batch)]
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cached_measurement(key: str, measure: Callable[[], dict]) -> tuple[dict, bool]:
    """(measurement, whether it came from the cache) for `key`, measuring on a miss."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key], True
    found = measure()
    _CACHE[key] = found
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return found, False


def measure_model_damage(model: nn.Module, example_inputs, loader, *,
                         fractions: Sequence[float] = FRACTIONS, criterion: str = "l2") -> dict:
    """`measure_damage` of a dense model, planned as `prune(method=criterion)` plans it.

    Args:
        model: the dense model (not modified).
        example_inputs: its example inputs.
        loader: training batches ``(inputs, labels)``; 12 are read, its shuffling is kept.
        fractions: shares of a group's channels to remove, one try each.
        criterion: the criterion ordering a group's channels (a data criterion such as
            `taylor` reads its first batches).
    """
    from metaprune.pruning.engine import plan_for_damage  # the engine imports this module

    return plan_for_damage(model, example_inputs, loader, criterion=criterion,
                           fractions=fractions)


def damage_policy(measurement: dict, speedup: float) -> dict[str, float]:
    """Group root -> keep ratio: the measured allocation removing ``1 - 1/speedup`` of the MACs
    at the least summed damage, groups taken as independent.

    Greedy on marginal damage per MAC saved, each step jumping a group to whichever of its
    further measured fractions has the lowest ratio (the lower convex hull, so a curve that is
    flat after a steep start is not skipped). Groups never chosen keep 1.0.

    Example::

        measurement = {"macs": 100, "groups": [
            {"root": "a", "fraction": [0.5], "damage": [0.1], "macs_saved": [40.0]},
            {"root": "b", "fraction": [0.5], "damage": [0.9], "macs_saved": [40.0]}]}
        damage_policy(measurement, 1.5)   # {'a': 0.5, 'b': 1.0}
    """
    groups = measurement["groups"]
    goal = (1.0 - 1.0 / speedup) * float(measurement["macs"] or 0.0)
    state = [-1] * len(groups)  # index of each group's chosen fraction (-1: none removed)

    def level(g: int, i: int) -> tuple[float, float]:
        curve = groups[g]
        return (0.0, 0.0) if i < 0 else (curve["damage"][i], curve["macs_saved"][i])

    saved = 0.0
    while saved < goal:
        best = None
        for g, curve in enumerate(groups):
            damage_now, saved_now = level(g, state[g])
            for j in range(state[g] + 1, len(curve["fraction"])):
                gain = curve["macs_saved"][j] - saved_now
                if gain <= 0:
                    continue
                ratio = (curve["damage"][j] - damage_now) / gain
                if best is None or ratio < best[0]:
                    best = (ratio, g, j)
        if best is None:
            break  # every group at its deepest measured fraction
        _, g, j = best
        saved += groups[g]["macs_saved"][j] - level(g, state[g])[1]
        state[g] = j
    return {curve["root"]: 1.0 if i < 0 else 1.0 - curve["fraction"][i]
            for curve, i in zip(groups, state)}

