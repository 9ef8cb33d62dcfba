"""Message passing over a network graph in both directions, with edge updates.

A channel's role depends on what feeds it (its incoming weights) and on what reads it (its
outgoing weights), so every block sends messages along the edges (input channel -> output
channel) and against them, with separate MLPs, and then updates every edge from its two end
nodes. Fan-in ranges from 1 (identity edges) to thousands (a wide Linear), hence several
aggregations side by side and layer normalisation before every update.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
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
        """e + MLP(LayerNorm([h_src, h_dst, e])), one row per edge."""
        return e + self.edge_update(self.edge_norm(torch.cat([h_src, h_dst, e], dim=-1)))

    # -- the same round on edge grids (see `metaprune.metanet.grids`) ----------------------
    # A grid's end-node embeddings broadcast (``[1, cols, hidden]`` against ``[rows, 1,
    # hidden]``), so every first layer is split by its input blocks: the node blocks are
    # applied once per node, and only the edge block costs a product per edge.

    def message_terms(self, h: torch.Tensor) -> "MessageTerms":
        """Per-node parts of both directions' first message layers, for one round."""
        forward = self.forward_messages.message_mlp[0]
        reverse = self.reverse_messages.message_mlp[0]
        width = h.shape[-1]
        sender, receiver, edge = slice(0, width), slice(width, 2 * width), slice(2 * width, None)
        # forward messages read [h_src, h_dst, e], reverse ones [h_dst, h_src, e]
        at_src = torch.cat([forward.weight[:, sender], reverse.weight[:, receiver]])
        at_dst = torch.cat([forward.weight[:, receiver], reverse.weight[:, sender]])
        return MessageTerms(F.linear(h, at_src),
                            F.linear(h, at_dst, torch.cat([forward.bias, reverse.bias])),
                            torch.cat([forward.weight[:, edge], reverse.weight[:, edge]]))

    def grid_messages(self, terms: "MessageTerms", src: torch.Tensor, dst: torch.Tensor,
                      e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and reverse messages [rows, cols, hidden] of a grid's edges `e`, without
        the last layers' biases (`message_biases`): every aggregate but var/std commutes with
        a shift, so `NodeAggregation` adds them per node instead of per edge."""
        rows, cols, width = e.shape
        # node parts summed once into the product's output: the gemm accumulates into them
        node = at_both_ends(terms.at_src, terms.at_dst, src, dst, rows, cols)
        flat = e.reshape(rows * cols, width)
        if torch.is_grad_enabled():
            hidden = F.silu(torch.addmm(node, flat, terms.edge_weight.t()))
        else:  # in place: no second buffer of the edges' size
            hidden = F.silu(node.addmm_(flat, terms.edge_weight.t()), inplace=True)
        forward = self.forward_messages.message_mlp[2]
        reverse = self.reverse_messages.message_mlp[2]
        return (torch.mm(hidden[:, :width], forward.weight.t()).view(rows, cols, -1),
                torch.mm(hidden[:, width:], reverse.weight.t()).view(rows, cols, -1))

    def message_biases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The biases `grid_messages` leaves out: forward, reverse."""
        return self.forward_messages.message_mlp[2].bias, self.reverse_messages.message_mlp[2].bias

    def update_terms(self, h: torch.Tensor) -> "UpdateTerms":
        """Per-node parts of the edge update's LayerNorm and first layer, for one round.

        The LayerNorm's gain is folded into the first layer, and so is its centring: the
        layer applied to ``x - mean(x)`` is the layer minus its row sums / n in every column,
        so the per-node and per-edge products already come centred.
        """
        norm, first = self.edge_norm, self.edge_update[0]
        width = h.shape[-1]
        scaled = first.weight * norm.weight  # LayerNorm's gain folded into the layer
        centred = scaled - scaled.sum(1, keepdim=True) / (3 * width)
        return UpdateTerms(
            F.linear(h, centred[:, :width]), F.linear(h, centred[:, width:2 * width]),
            centred[:, 2 * width:], F.linear(norm.bias, first.weight, first.bias),
            h.sum(-1), h.square().sum(-1), norm.eps)

    def grid_update_edges(self, terms: "UpdateTerms", src: torch.Tensor, dst: torch.Tensor,
                          e: torch.Tensor) -> torch.Tensor:
        """`update_edges` of a grid: LayerNorm statistics of [h_src, h_dst, e] from per-node
        and per-edge sums, so the 3 * hidden concatenation is never built.

        Without gradients `e` is consumed: the new embeddings are written over it.
        """
        rows, cols, width = e.shape
        count = 3 * width
        flat = e.reshape(rows * cols, width)
        node = at_both_ends(terms.at_src, terms.at_dst, src, dst, rows, cols)
        # statistics combined in the node terms' dtype (fp32) even when the edges are bf16:
        # the per-edge sums accumulate in fp32 inside the kernel and are rounded once
        # (a cast of every edge state to fp32 first would cost more than the update saves)
        stats = terms.sums.dtype
        mean = (at_both_ends(terms.sums, terms.sums, src, dst, rows, cols)
                + flat.sum(-1).to(stats)) / count
        last = self.edge_update[2]
        if torch.is_grad_enabled():
            square = at_both_ends(terms.squares, terms.squares, src, dst, rows, cols) \
                + flat.square().sum(-1)
            inv_std = (square / count - mean * mean + terms.eps).rsqrt().unsqueeze(-1)
            pre = torch.addmm(node, flat, terms.edge_weight.t()) * inv_std + terms.bias
            return (flat + last(F.silu(pre))).view(rows, cols, width)
        # the same in place: no second buffer of the edges' size
        square = torch.linalg.vector_norm(flat, dim=-1).to(stats).square_()
        square.add_(at_both_ends(terms.squares, terms.squares, src, dst, rows, cols))
        inv_std = square.div_(count).addcmul_(mean, mean, value=-1).add_(terms.eps).rsqrt_()
        pre = node.addmm_(flat, terms.edge_weight.t())
        pre = torch.addcmul(terms.bias, pre, inv_std.to(pre.dtype).unsqueeze(-1), out=pre)
        hidden = F.silu(pre, inplace=True)
        return flat.addmm_(hidden, last.weight.t()).add_(last.bias).view(rows, cols, width)


def take(table: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """``table[nodes]`` for a grid's node tensor (``[rows or 1, cols or 1]``), by
    `index_select`: several times faster than advanced indexing on the CPU."""
    return table.index_select(0, nodes.reshape(-1)).view(*nodes.shape, *table.shape[1:])


def at_both_ends(at_src: torch.Tensor, at_dst: torch.Tensor, src: torch.Tensor,
                 dst: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``at_src[src] + at_dst[dst]`` for every edge of a rows x cols grid, flat
    (``[rows * cols, ...]``) and freshly allocated: callers write over it."""
    both = take(at_src, src) + take(at_dst, dst)
    return both.expand(rows, cols, *both.shape[2:]).reshape(rows * cols, *both.shape[2:])


@dataclass
class MessageTerms:
    at_src: torch.Tensor  # [nodes, 2 * hidden]: forward sender / reverse receiver parts
    at_dst: torch.Tensor  # [nodes, 2 * hidden]: forward receiver / reverse sender parts + bias
    edge_weight: torch.Tensor  # [2 * hidden, hidden]: both directions' edge blocks

    def to(self, dtype: torch.dtype) -> "MessageTerms":
        """The terms in the edges' dtype (computed in the nodes')."""
        return MessageTerms(self.at_src.to(dtype), self.at_dst.to(dtype),
                            self.edge_weight.to(dtype))


@dataclass
class UpdateTerms:
    at_src: torch.Tensor  # [nodes, hidden], centred (see `update_terms`)
    at_dst: torch.Tensor  # [nodes, hidden], centred
    edge_weight: torch.Tensor  # [hidden, hidden]
    bias: torch.Tensor  # [hidden]: the first layer of the LayerNorm bias, plus its own bias
    sums: torch.Tensor  # [nodes]: sum of each node's embedding
    squares: torch.Tensor  # [nodes]: sum of its squares
    eps: float

    def to(self, dtype: torch.dtype) -> "UpdateTerms":
        """The per-edge terms in the edges' dtype; the statistics stay in the nodes'."""
        return UpdateTerms(self.at_src.to(dtype), self.at_dst.to(dtype),
                           self.edge_weight.to(dtype), self.bias.to(dtype), self.sums,
                           self.squares, self.eps)
