"""How many channels each group loses: global ranking, uniform ratio, or a per-layer policy.

Every allocation is a one-parameter family of removal counts that prunes more as the
parameter grows (a global importance threshold, a uniform ratio, or the exponent applied to a
policy's keep ratios), so a MACs or params target is met by bisecting that parameter against
the analytic cost model.
"""

import math
from collections.abc import Callable

import torch

from metaprune.errors import InvalidTargetError
from metaprune.pruning.groups import ChannelGroup, minimum_kept, snap_removal
from metaprune.vocabulary import parse_policy

MIN_KEEP_FRACTION = 0.1  # each layer keeps at least this share of its channels


def removal_order(group: ChannelGroup, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, keys): root channels least important first, and a non-decreasing key per position.

    Removing the first k channels of `order` removes every channel whose key is below
    `keys[k]`. Attention groups are ordered in rounds — the r-th weakest channel of every head
    — so any removal that is a multiple of the head count leaves all heads equally wide.
    """
    scores = scores.detach().double().cpu()
    if group.head_of_channel is None:
        order = torch.argsort(scores, stable=True)
        return order, scores[order]
    heads = group.head_of_channel
    per_head = [torch.nonzero(heads == h).flatten() for h in range(int(heads.max()) + 1)]
    per_head = [idx[torch.argsort(scores[idx], stable=True)] for idx in per_head]
    order, keys = [], []
    for position in range(min(len(idx) for idx in per_head)):
        round_idx = torch.stack([idx[position] for idx in per_head])
        round_idx = round_idx[torch.argsort(scores[round_idx], stable=True)]
        order.append(round_idx)
        keys.append(scores[round_idx].max().repeat(len(round_idx)))
    keys = torch.cummax(torch.cat(keys), 0).values
    return torch.cat(order), keys


class Allocation:
    """A monotone family `counts(theta)` of per-group removal counts, theta in [low, high].

    Args:
        groups: the model's channel groups (blocked ones are never pruned).
        keys: per group, the non-decreasing keys from `removal_order` (None when blocked).
        counts_at: function (theta, group, keys, max_removed) -> removal count.
        low, high: the parameter range; `high` prunes every group to its floor.
    """

    def __init__(self, groups, keys, counts_at: Callable, low: float, high: float,
                 siblings: list[list[int]] | None = None) -> None:
        self.groups, self.keys, self._counts_at = groups, keys, counts_at
        self.low, self.high = low, high
        # positions of groups that must keep equal counts (the same layer role in every
        # block); the target search moves them together first. None: every group alone.
        self.siblings = siblings
        self.max_removed = [
            0 if g.blocked else g.size - minimum_kept(g.size, g.step, MIN_KEEP_FRACTION)
            for g in groups
        ]

    def counts(self, theta: float) -> list[int]:
        return [
            0 if g.blocked else self._counts_at(theta, g, k, m)
            for g, k, m in zip(self.groups, self.keys, self.max_removed)
        ]


def global_allocation(groups: list[ChannelGroup], keys: list) -> Allocation:
    """Removes the theta least important channels of a ranking across all groups.

    Channels are ranked by normalised importance; ties (e.g. freshly initialised BatchNorm
    scales) are broken by the channel's relative position in its own group's order, so equal
    scores prune every group by the same share instead of emptying one group first.
    """
    entries = []
    for index, (group, group_keys) in enumerate(zip(groups, keys)):
        if group.blocked or group_keys is None:
            continue
        positions = torch.arange(group.size, dtype=torch.float64)
        entries.append((index, group_keys, (positions + 0.5) / group.size))
    if not entries:
        return Allocation(groups, keys, lambda *args: 0, 0.0, 0.0)
    all_keys = torch.cat([k for _, k, _ in entries])
    all_fractions = torch.cat([f for _, _, f in entries])
    owner = torch.cat([torch.full((len(k),), i, dtype=torch.long) for i, k, _ in entries])
    by_fraction = torch.argsort(all_fractions, stable=True)
    ranking = by_fraction[torch.argsort(all_keys[by_fraction], stable=True)]
    rank_of_entry = torch.empty_like(ranking)
    rank_of_entry[ranking] = torch.arange(len(ranking))
    # ranks of every group's channels, in the group's own removal order
    ranks = {i: torch.sort(rank_of_entry[owner == i]).values for i, _, _ in entries}
    index_of = {id(groups[i]): i for i, _, _ in entries}

    def counts_at(theta, group, group_keys, max_removed):
        removed = int(torch.searchsorted(ranks[index_of[id(group)]], int(theta)))
        return snap_removal(removed, group.size, group.step, max_removed)

    return Allocation(groups, keys, counts_at, 0.0, float(len(ranking)))


def uniform_allocation(groups: list[ChannelGroup], keys: list) -> Allocation:
    """Removes the same fraction theta of every group's channels.

    Groups of the same shape (size, step, channels per head: the MLP of every block, the
    key-value heads of every attention) are siblings: the target search moves them together, so
    every block of a transformer keeps the same widths — what a model config such as
    HuggingFace's ``intermediate_size`` / ``num_attention_heads`` can state.
    """

    def counts_at(theta, group, group_keys, max_removed):
        return snap_removal(round(theta * group.size, 6), group.size, group.step, max_removed)

    shapes: dict[tuple, list[int]] = {}
    for position, group in enumerate(groups):
        if not group.blocked:
            per_head = None if group.head_of_channel is None else \
                tuple(torch.bincount(group.head_of_channel).tolist())
            shapes.setdefault((group.size, group.step, per_head), []).append(position)
    return Allocation(groups, keys, counts_at, 0.0, 1.0, siblings=list(shapes.values()))


def policy_allocation(groups: list[ChannelGroup], keys: list,
                      keep_ratio_of_group: list[float]) -> Allocation:
    """Keeps keep_ratio ** theta of each group: theta = 1 is the policy as given."""

    ratio_of = {id(group): ratio for group, ratio in zip(groups, keep_ratio_of_group)}

    def counts_at(theta, group, group_keys, max_removed):
        keep = ratio_of[id(group)] ** theta
        return snap_removal(round((1.0 - keep) * group.size, 6), group.size, group.step,
                            max_removed)

    # theta at which even the mildest pruned layer has fallen to its floor
    mildest = max([r for r in keep_ratio_of_group if r < 1.0] or [0.5])
    high = math.log(MIN_KEEP_FRACTION / 2) / math.log(mildest)
    return Allocation(groups, keys, counts_at, 0.0, max(high, 1.0))


def load_policy(policy) -> dict[str, float]:
    """A policy from a dict, a `metaprune tune` recipe, or a JSON file of either: module name
    -> keep ratio in (0, 1] (`metaprune.vocabulary.parse_policy`).

    Example::

        load_policy({"conv1": 0.5, "conv2": 0.7})               # {'conv1': 0.5, 'conv2': 0.7}
        load_policy({"policy": {"conv1": 0.5}, "speedup": 2.0})  # {'conv1': 0.5}
    """
    return parse_policy(policy)


def policy_to_groups(policy: dict[str, float], groups: list[ChannelGroup],
                     module_names: set[str]) -> list[float]:
    """Keep ratio of every group from a per-module policy (1.0 for groups it does not name).

    A group takes the ratio of its root layer, else of the first layer in it whose output
    channels the policy names. Unknown modules and modules without prunable output channels
    are errors, so a typo never silently prunes nothing.
    """
    owner: dict[str, ChannelGroup] = {}
    for group in groups:
        for use in group.uses:
            if use.side == "out":
                owner.setdefault(use.unit, group)
    for name, ratio in policy.items():
        if name not in module_names:
            known = ", ".join(sorted(owner)[:8])
            raise InvalidTargetError(
                f"policy names module {name!r}, which the model does not have "
                f"(prunable modules include: {known})"
            )
        if name not in owner:
            raise InvalidTargetError(f"policy names module {name!r}, which has no prunable "
                                     "output channels")
        if owner[name].blocked and ratio < 1.0:
            raise InvalidTargetError(
                f"policy asks to prune {name!r}, whose channels cannot be pruned: "
                f"{owner[name].blocked}"
            )
    ratios = []
    for group in groups:
        ratio = policy.get(group.root)
        if ratio is None:
            ratio = next((policy[u.unit] for u in group.uses
                          if u.side == "out" and u.unit in policy), 1.0)
        ratios.append(ratio)
    return ratios
