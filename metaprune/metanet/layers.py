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

from metaprune.metanet.edges import mlp, split_linear


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

    def grid_messages(self, h_j: torch.Tensor, h_i: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """`message` on a grid of edges: sender and receiver embeddings gathered as grids
        (``[1, cols, hidden]``, ``[rows, 1, hidden]``, ...) broadcast against `e`
        [rows, cols, hidden], with the first layer split so nothing per edge is concatenated."""
        first, activation, last = self.message_mlp
        return last(activation(split_linear(first, [h_j, h_i, e])))


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
        """The round on an edge list (the reference formulation, see `scatter_reference`)."""
        forward = self.forward_messages(h, edge_index, e)
        reverse = self.reverse_messages(h, edge_index.flip(0), e)
        h = self.update_nodes(h, forward, reverse)
        source, target = edge_index
        return h, self.update_edges(h[source], h[target], e)

    def update_nodes(self, h: torch.Tensor, forward: torch.Tensor,
                     reverse: torch.Tensor) -> torch.Tensor:
        """h + MLP(LayerNorm([h, forward aggregate, reverse aggregate]))."""
        return h + self.node_update(self.node_norm(torch.cat([h, forward, reverse], dim=-1)))

    def update_edges(self, h_src: torch.Tensor, h_dst: torch.Tensor,
                     e: torch.Tensor) -> torch.Tensor:
        """e + MLP(LayerNorm([h_src, h_dst, e])), end-node embeddings broadcast against `e`
        (gathered per edge, or as grids ``[1, cols, hidden]`` / ``[rows, 1, hidden]``)."""
        shape = torch.broadcast_shapes(h_src.shape, h_dst.shape, e.shape)
        z = torch.cat([h_src.expand(shape), h_dst.expand(shape), e.expand(shape)], dim=-1)
        return e + self.edge_update(self.edge_norm(z))
