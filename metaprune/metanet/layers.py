"""Message passing over a network graph in both directions, with edge updates.

A channel's role depends on what feeds it (its incoming weights) and on what reads it (its
outgoing weights), so every block sends messages along the edges (input channel -> output
channel) and against them, with separate MLPs, and then updates every edge from its two end
nodes. Fan-in ranges from 1 (identity edges) to thousands (a wide Linear), hence several
aggregations side by side and layer normalisation before every update.
"""

from collections.abc import Sequence

import torch
from torch import nn
from torch_geometric.nn import MessagePassing
from torch_geometric.nn.aggr import MultiAggregation

from metaprune.metanet.edges import mlp


class DirectedMessages(MessagePassing):
    """Messages from source to target nodes of `edge_index`, from both nodes and the edge.

    m_ij = MLP([h_j, h_i, e_ij]), aggregated at i with every aggregation in `aggregations`
    (concatenated, so the output is ``len(aggregations) * hidden`` wide).

    Args:
        hidden: node and edge embedding width.
        aggregations: PyG aggregation names, e.g. ``("sum", "mean", "max")``.

    Example::

        forward = DirectedMessages(32, ("sum", "mean", "max"))
        agg = forward(h, edge_index, e)                   # [num_nodes, 96]
        backward = forward(h, edge_index.flip(0), e)      # against the edges
    """

    def __init__(self, hidden: int, aggregations: Sequence[str]):
        super().__init__(aggr=MultiAggregation(list(aggregations), mode="cat"))
        self.message_mlp = mlp([3 * hidden, hidden, hidden])

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.propagate(edge_index, h=h, e=e)

    def message(self, h_i: torch.Tensor, h_j: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.message_mlp(torch.cat([h_j, h_i, e], dim=-1))


class BidirectionalBlock(nn.Module):
    """One round: forward and reverse messages update the nodes, then the nodes the edges.

    Both updates are residual (h + MLP(LayerNorm(...))), so stacking blocks stays stable.

    Args:
        hidden: node and edge embedding width.
        aggregations: PyG aggregation names used by both directions.
    """

    def __init__(self, hidden: int, aggregations: Sequence[str]):
        super().__init__()
        width = len(aggregations) * hidden
        self.forward_messages = DirectedMessages(hidden, aggregations)  # input -> output channel
        self.reverse_messages = DirectedMessages(hidden, aggregations)  # output -> input channel
        self.node_norm = nn.LayerNorm(hidden + 2 * width)
        self.node_update = mlp([hidden + 2 * width, hidden, hidden])
        self.edge_norm = nn.LayerNorm(3 * hidden)
        self.edge_update = mlp([3 * hidden, hidden, hidden])

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor,
                e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        forward = self.forward_messages(h, edge_index, e)
        reverse = self.reverse_messages(h, edge_index.flip(0), e)
        h = h + self.node_update(self.node_norm(torch.cat([h, forward, reverse], dim=-1)))
        source, target = edge_index
        e = e + self.edge_update(self.edge_norm(torch.cat([h[source], h[target], e], dim=-1)))
        return h, e
