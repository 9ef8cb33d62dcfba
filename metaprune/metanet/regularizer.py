"""DepGraph-style group-sparsity regulariser, computed on (rewritten) graph features.

Channels that can only be removed together (`NetworkGraph.coupled_channels`: residual adds,
depthwise convolutions, norm copies) form a group. A group's norm is the L2 norm of every
parameter that disappears with it: the weights producing its channels (incoming edges), the
weights reading them (outgoing edges) and the per-channel bias and norm affine slots. Summing
group norms (a group lasso) drives whole groups towards zero, so the metanetwork learns to
output networks whose channels are easy to remove. Groups that hold model input or output
channels can never be pruned and are left out.
"""

import torch
from torch_geometric.utils import scatter

from metaprune.graph import PARAM_SLOTS, edge_groups
from metaprune.graph.features import SCALAR, SLOT

# Per-channel slots that vanish with the channel; running statistics are buffers, not weights.
PRUNED_SLOTS = tuple(SLOT[name] for name in ("bias", "norm_weight", "norm_bias", "scale"))


class GroupSparsity:
    """Group norms of a graph's coupled channel groups, for any rewritten features.

    The grouping is computed once per graph; calling the object is differentiable in `x` and
    `edge_attr`.

    Args:
        graph: the `NetworkGraph` the features belong to.

    Example::

        regularizer = GroupSparsity(graph)
        params = graph.parameters(new_x, new_edge_attr)
        loss = task_loss + 1e-4 * regularizer(new_x, new_edge_attr)
        regularizer.group_norms(new_x, new_edge_attr)   # [num_groups]
    """

    def __init__(self, graph):
        data = graph.data
        self._data = data
        component = graph.coupled_channels()
        fixed = (data.x[:, SCALAR["is_input"]] > 0) | (data.x[:, SCALAR["is_output"]] > 0)
        num = int(component.max()) + 1 if component.numel() else 0
        fixed_component = scatter(fixed.long(), component, 0, num, "max").bool()
        prunable = ~fixed_component
        # renumber prunable components 0..groups-1; channels of fixed ones map to `groups`
        new_id = torch.full((num,), -1, dtype=torch.long)
        new_id[prunable] = torch.arange(int(prunable.sum()))
        self.num_groups = int(prunable.sum())
        self._group_of_node = torch.where(new_id[component] >= 0, new_id[component],
                                          torch.full_like(component, self.num_groups))
        self._slot_mask = torch.zeros(len(PARAM_SLOTS), dtype=torch.bool)
        self._slot_mask[list(PRUNED_SLOTS)] = True
        # the layer a group is ranked in: the first layer among its channels
        in_group = self._group_of_node < self.num_groups
        self._group_layer = scatter(data.layer.long()[in_group], self._group_of_node[in_group],
                                    0, self.num_groups, "min")

    def group_norms(self, x: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        """L2 norm of every prunable group's parameters, [num_groups]."""
        data = self._data
        edge_squares = []
        for group in edge_groups(data, edge_attr):
            if group.k == 0:
                edge_squares.append(edge_attr.new_zeros(group.attr.shape[0]))
            else:
                edge_squares.append(group.attr.square().sum(1))
        edge_sq = torch.cat(edge_squares) if edge_squares else edge_attr.new_zeros(0)
        num_nodes = x.shape[0]
        source, target = data.edge_index
        node_sq = scatter(edge_sq, target, 0, num_nodes, "sum") \
            + scatter(edge_sq, source, 0, num_nodes, "sum")
        slots = x[:, :len(PARAM_SLOTS)] * (data.x_param_mask & self._slot_mask)
        node_sq = node_sq + slots.square().sum(1)
        squares = scatter(node_sq, self._group_of_node, 0, self.num_groups + 1, "sum")
        # eps inside the root: the gradient of sqrt stays finite for a group already at zero
        return (squares[:self.num_groups] + 1e-12).sqrt()

    def __call__(self, x: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        """The group lasso: the sum of `group_norms`."""
        return self.group_norms(x, edge_attr).sum()

    def sparse_learning_penalty(self, norms: torch.Tensor, alpha: float = 16.0) -> torch.Tensor:
        """Torch-pruning's sparse-learning penalty on group norms, differentiable in `norms`.

        Within each layer the importance is the group norm over the layer's largest (the max
        normaliser) and every group is weighed ``alpha ** ((1 - imp) / (1 - imp_min))``: the
        weakest group of a layer by ``alpha``, the strongest by 1. The penalty is
        ``sum(weight * norm ** 2) / 2``, whose gradient ``weight * w`` on every weight of a
        group is what `GroupNormPruner.regularize` adds (DepGraph's sparse learning), so weak
        groups are pushed to zero much harder than strong ones.
        """
        layer = self._group_layer
        num_layers = int(layer.max()) + 1 if layer.numel() else 0
        detached = norms.detach()
        top = scatter(detached, layer, 0, num_layers, "max")[layer].clamp_min(1e-12)
        importance = detached / top
        low = scatter(importance, layer, 0, num_layers, "min")[layer]
        spread = (1 - low).clamp_min(1e-12)
        weight = alpha ** ((1 - importance) / spread)
        return (weight * norms.square()).sum() / 2

    def _rank_in_layer(self, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rank of every group among its layer's groups by norm, groups per layer)."""
        layer = self._group_layer
        by_norm = torch.argsort(norms.detach(), stable=True)
        order = by_norm[torch.argsort(layer[by_norm], stable=True)]  # by layer, then by norm
        counts = torch.bincount(layer, minlength=int(layer.max()) + 1 if layer.numel() else 0)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        return rank - first[layer], counts

    def weakest_groups(self, norms: torch.Tensor, fraction: float,
                       allocation: str = "uniform", min_keep: float = 0.1) -> torch.Tensor:
        """[num_groups] bool: the groups an L2 prune removing `fraction` of them would drop.

        ``"uniform"``: in every layer, the `fraction` of its groups with the least norm (what a
        uniform per-layer ratio removes; rounded down, so a layer never loses all its groups
        while `fraction` < 1). ``"global"``: the engine's global allocation — squared group
        norms over their layer's mean (the mean normaliser) ranked across layers, the weakest
        `fraction` of all groups dropped, every layer keeping at least `min_keep` of its groups.
        """
        if not 0 <= fraction < 1:
            raise ValueError(f"fraction must lie in [0, 1), got {fraction}")
        rank, counts = self._rank_in_layer(norms)
        layer = self._group_layer
        if allocation == "uniform":
            return rank < torch.floor(counts[layer] * fraction)
        if allocation != "global":
            raise ValueError(f"allocation must be 'uniform' or 'global', got {allocation!r}")
        squares = norms.detach().square()
        mean = scatter(squares, layer, 0, counts.numel(), "mean")[layer].clamp_min(1e-12)
        most = counts - torch.ceil(counts * min_keep).long()
        droppable = rank < most[layer]
        score = torch.where(droppable, squares / mean, torch.full_like(squares, float("inf")))
        take = min(int(layer.numel() * fraction), int(droppable.sum()))
        dropped = torch.zeros_like(droppable)
        dropped[torch.argsort(score, stable=True)[:take]] = True
        return dropped

    def keep_gates(self, norms: torch.Tensor, fraction: float,
                   temperature: float = 0.1, allocation: str = "uniform") -> torch.Tensor:
        """[num_groups] 0/1 keep gates of an L2 prune of `fraction` of the groups (allocated
        as `weakest_groups` does), with soft gradients.

        The forward value is ``~weakest_groups(norms, fraction)`` (to rounding); the gradient
        is the one of ``sigmoid((norm - threshold) / (temperature * layer mean norm))``
        (straight through), the threshold lying halfway between a layer's strongest dropped
        and weakest kept group. So a loss on the gated network tells which groups should have
        been kept: raising their norms above the threshold, or lowering others below it, is
        rewarded.
        """
        dropped = self.weakest_groups(norms, fraction, allocation)
        layer = self._group_layer
        num_layers = int(layer.max()) + 1 if layer.numel() else 0
        detached = norms.detach()
        inf = torch.full_like(detached, float("inf"))
        top_dropped = scatter(torch.where(dropped, detached, -inf), layer, 0, num_layers, "max")
        low_kept = scatter(torch.where(dropped, inf, detached), layer, 0, num_layers, "min")
        threshold = ((top_dropped + low_kept) / 2)[layer]
        scale = scatter(detached, layer, 0, num_layers, "mean")[layer].clamp_min(1e-12)
        soft = torch.sigmoid((norms - threshold) / (temperature * scale))
        # layers that drop nothing have threshold -inf: their gates are 1 with no gradient
        soft = torch.where(torch.isfinite(threshold), soft, torch.ones_like(soft))
        hard = (~dropped).to(norms.dtype)
        return hard + soft - soft.detach()

    def drop_groups(self, x: torch.Tensor, edge_attr: torch.Tensor, keep: torch.Tensor):
        """``(x, edge_attr)`` with every group's channels multiplied by its `keep` gate.

        `keep` is [num_groups], bool or float (e.g. `keep_gates`). A gate of 0 zeroes every
        weight into and out of the group's channels and their bias and norm affine, so the
        channels output nothing: the network behaves as if they were pruned. Differentiable
        in `x`, `edge_attr` and a float `keep`.
        """
        keep = keep.to(x.dtype)
        keep_node = torch.cat([keep, keep.new_ones(1)])[self._group_of_node]
        source, target = self._data.edge_index
        keep_edge = keep_node[source] * keep_node[target]
        per_entry = torch.cat([keep_edge[group.edges].repeat_interleave(group.k)
                               for group in edge_groups(self._data, edge_attr)])
        slot_keep = torch.where(self._slot_mask, keep_node.unsqueeze(1),
                                torch.ones_like(keep_node).unsqueeze(1))
        slots = x[:, :len(PARAM_SLOTS)] * slot_keep
        return torch.cat([slots, x[:, len(PARAM_SLOTS):]], dim=1), edge_attr * per_entry


def group_sparsity(graph, x: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
    """One-off `GroupSparsity(graph)(x, edge_attr)`; keep the object when calling repeatedly."""
    return GroupSparsity(graph)(x, edge_attr)
