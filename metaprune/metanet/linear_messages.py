"""Message passing whose messages are linear in the edge weights: a layer's aggregate is a
matmul of its weight block with node states, with no per-edge hidden state.

The ``"mlp"`` message kind (`metaprune.metanet.layers`) runs a 32-wide MLP on every edge in
every round; on a ViT-B/16 (86 M edges) that is about a TFLOP, beyond what a CPU does in a
minute. Here an edge carries only `EDGE_CHANNELS` fixed numbers read from its `k` weights
(normalised by the layer's RMS): a 1 (the edge exists), the mean and the RMS of its entries.
The message from node j to node i is

    m_ij = sum_c E_ijc * (A_c h_j + b_c)

so the sum over a dense layer's inputs, for every output channel at once, is
``E.reshape(out, in * C) @ table[inputs].reshape(in * C, hidden)``: one matmul of the weight
block with the node table (``table = h @ A^T + b``), the same in the reverse direction
(against the edges) with the block transposed. Grids whose nodes vary along both axes
(grouped convolutions) build their messages per edge and reduce them along the axes where the
target is constant, as `metaprune.metanet.grids.NodeAggregation` does. Nonlinearities,
LayerNorm and MLPs act on nodes only. An edge list implementation of the same messages,
`scatter_linear_forward`, is the test oracle.

The weight rewrite is low-rank per block: ``delta_ijk = (w_ijk <u_i, v_j> + <p_i, q_j>) * rms``
with u, p read from the target node and v, q from the source, one matmul per block as well.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from metaprune.graph import EdgeGrid
from metaprune.metanet.edges import mlp
from metaprune.metanet.layers import take

EDGE_CHANNELS = 3  # per edge: 1, mean of its normalised weights, their RMS
# aggregations this kind can compute as matmuls: the sum divided by the node's count of
# messages (mean) or by its square root (as in GCN: fan-ins from 1 to thousands stay O(1))
LINEAR_AGGREGATIONS = ("mean", "norm_sum")
DEFAULT_LINEAR_AGGREGATIONS = ("mean", "norm_sum")
LINEAR_CHUNK_ENTRIES = 1 << 18  # weights per chunk: matmuls large enough to run at speed


def edge_channels(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols, k] normalised weights -> [rows, cols, EDGE_CHANNELS] edge features.

    An identity edge (k = 0) is ``[1, 0, 0]``.
    """
    rows, cols, k = values.shape
    ones = values.new_ones(rows, cols, 1)
    if k == 0:
        return torch.cat([ones, values.new_zeros(rows, cols, EDGE_CHANNELS - 1)], dim=-1)
    mean = values.mean(-1, keepdim=True)
    rms = values.square().mean(-1, keepdim=True).sqrt()
    return torch.cat([ones, mean, rms], dim=-1)


def _varying(nodes: torch.Tensor) -> set[int]:
    return {axis for axis in (0, 1) if nodes.shape[axis] > 1}


def block_sums(channels: torch.Tensor, table: torch.Tensor, source: torch.Tensor,
               target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of the messages ``sum_c E_ijc table[j, c]`` of one grid at its target nodes.

    Args:
        channels: [rows, cols, C] edge features (`edge_channels`).
        table: [nodes, C, hidden] what each node sends per channel.
        source: [rows or 1, cols or 1] sending node of every edge.
        target: [rows or 1, cols or 1] receiving node of every edge.

    Returns:
        ``(nodes, sums)``: [n] target nodes (repeats allowed) and [n, hidden] their sums.
    """
    rows, cols, width = channels.shape
    hidden = table.shape[-1]
    by_target, by_source = _varying(target), _varying(source)
    if len(by_target) <= 1 and len(by_source) <= 1 and not by_target & by_source:
        # a layer's weight block: the target indexes one axis, the source the other -> matmul
        out_axis = next(iter(by_target)) if by_target else 1 - next(iter(by_source), 1)
        block = channels if out_axis == 0 else channels.transpose(0, 1)
        count_out, count_in = block.shape[:2]
        senders = source.reshape(-1).expand(count_in)  # one node per input, or one for all
        sums = block.reshape(count_out, count_in * width) @ \
            table.index_select(0, senders).reshape(count_in * width, hidden)
        return target.reshape(-1).expand(count_out), sums
    # any other layout: messages per edge, reduced along the axes where the target is constant
    sent = take(table, source)  # [rows or 1, cols or 1, C, hidden]
    messages = (channels.unsqueeze(-2) @ sent).squeeze(-2)  # [rows, cols, hidden]
    axes = tuple(axis for axis in (0, 1) if target.shape[axis] == 1 and messages.shape[axis] > 1)
    reduced = messages.sum(axes, keepdim=True) if axes else messages
    nodes = target.expand(*reduced.shape[:2]).reshape(-1)
    return nodes, reduced.reshape(-1, hidden)


def message_counts(grids: list[EdgeGrid], num_nodes: int,
                   like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_nodes] messages each node receives along the edges, and against them."""
    incoming, outgoing = like.new_zeros(num_nodes), like.new_zeros(num_nodes)
    for grid in grids:
        for counts, nodes in ((incoming, grid.dst), (outgoing, grid.src)):
            axes = [axis for axis in (0, 1) if nodes.shape[axis] == 1]
            per_node = math.prod((grid.rows, grid.cols)[axis] for axis in axes)
            flat = nodes.expand(*(1 if axis in axes else (grid.rows, grid.cols)[axis]
                                  for axis in (0, 1))).reshape(-1)
            counts.index_add_(0, flat, like.new_full((flat.numel(),), float(per_node)))
    return incoming, outgoing


class LinearMessageBlock(nn.Module):
    """One round of linear messages along and against the edges, then a node update.

    ``h <- h + MLP(LayerNorm([h, forward aggregates, reverse aggregates]))``, the aggregates
    being `aggregations` of ``m_ij = sum_c E_ijc (A_c h_j + b_c)`` (forward: j an input channel
    of i; reverse: j an output channel of i, with its own A and b).

    Args:
        hidden: node embedding width.
        aggregations: names from `LINEAR_AGGREGATIONS`, used by both directions.

    Example::

        block = LinearMessageBlock(32, ("mean", "norm_sum"))
        forward_table, reverse_table = block.tables(h)     # [nodes, 3, 32] each
        # per grid: block_sums(edge_channels(w), forward_table, grid.src, grid.dst), ...
        h = block.update_nodes(h, forward_sums, reverse_sums, incoming, outgoing)
    """

    def __init__(self, hidden: int, aggregations):
        super().__init__()
        self.aggregations = list(aggregations)
        self.forward_messages = nn.Linear(hidden, EDGE_CHANNELS * hidden)  # A_c, b_c along
        self.reverse_messages = nn.Linear(hidden, EDGE_CHANNELS * hidden)  # ... and against
        width = hidden * (1 + 2 * len(self.aggregations))
        self.node_norm = nn.LayerNorm(width)
        self.node_update = mlp([width, hidden, hidden])

    def tables(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What every node sends per edge channel: forward, reverse, each [nodes, C, hidden]."""
        shape = (h.shape[0], EDGE_CHANNELS, h.shape[1])
        return self.forward_messages(h).view(shape), self.reverse_messages(h).view(shape)

    def _aggregate(self, sums: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for name in self.aggregations:
            power = 1.0 if name == "mean" else 0.5  # norm_sum: divided by sqrt(count)
            out.append(sums / counts.clamp_min(1).pow(power).unsqueeze(1))
        return out

    def update_nodes(self, h: torch.Tensor, forward_sums: torch.Tensor,
                     reverse_sums: torch.Tensor, incoming: torch.Tensor,
                     outgoing: torch.Tensor) -> torch.Tensor:
        """The residual node update from the rounds' message sums and message counts."""
        parts = [h, *self._aggregate(forward_sums, incoming),
                 *self._aggregate(reverse_sums, outgoing)]
        return h + self.node_update(self.node_norm(torch.cat(parts, dim=-1)))


class LowRankEdgeDecoder(nn.Module):
    """Weight deltas ``(w_ijk <u_i, v_j> + <p_i, q_j>)`` (normalised units) from node states:
    i the edge's target, j its source; one matmul per weight block.

    Args:
        hidden: node embedding width.
        rank: width of u, v, p, q.

    Example::

        decoder = LowRankEdgeDecoder(32, 8)
        factors = decoder.factors(h)
        delta = decoder.decode_grid(factors, values, grid.src, grid.dst)  # like values
    """

    def __init__(self, hidden: int, rank: int = 8):
        super().__init__()
        self.scale_target = nn.Linear(hidden, rank)  # u_i: how the target rescales its inputs
        self.scale_source = nn.Linear(hidden, rank)  # v_j
        self.shift_target = nn.Linear(hidden, rank)  # p_i: an offset shared by the k entries
        self.shift_source = nn.Linear(hidden, rank)  # q_j

    def factors(self, h: torch.Tensor) -> "EdgeFactors":
        return EdgeFactors(self.scale_target(h), self.scale_source(h), self.shift_target(h),
                           self.shift_source(h))

    def decode_grid(self, factors: "EdgeFactors", values: torch.Tensor, source: torch.Tensor,
                    target: torch.Tensor) -> torch.Tensor:
        """[rows, cols, k] deltas in normalised units for a grid's [rows, cols, k] weights."""
        scale = pairwise(factors.scale_target, factors.scale_source, target, source)
        shift = pairwise(factors.shift_target, factors.shift_source, target, source)
        rows, cols = values.shape[:2]
        return values * scale.expand(rows, cols).unsqueeze(-1) \
            + shift.expand(rows, cols).unsqueeze(-1)


@dataclass
class EdgeFactors:
    scale_target: torch.Tensor  # [nodes, rank]
    scale_source: torch.Tensor
    shift_target: torch.Tensor
    shift_source: torch.Tensor


def pairwise(at_target: torch.Tensor, at_source: torch.Tensor, target: torch.Tensor,
             source: torch.Tensor) -> torch.Tensor:
    """``<at_target[i], at_source[j]>`` for every edge of a grid, [rows or 1, cols or 1]: one
    matmul when target and source vary along different axes, else per edge."""
    by_target, by_source = _varying(target), _varying(source)
    left, right = take(at_target, target), take(at_source, source)  # [r|1, c|1, rank]
    if by_target <= {0} and by_source <= {1}:
        return left[:, 0] @ right[0].t()
    if by_target <= {1} and by_source <= {0}:
        return right[:, 0] @ left[0].t()
    return (left * right).sum(-1)


def linear_rounds(metanet, view, chunks, edge_scale: torch.Tensor,
                  h: torch.Tensor) -> torch.Tensor:
    """Node embeddings after every `LinearMessageBlock` round of `metanet` (on a `GraphView`).

    `edge_scale` is every layer's weight RMS; `chunks` the grids cut into runs of rows.
    """
    incoming, outgoing = message_counts(view.grids, h.shape[0], h)
    for block in metanet.blocks:
        forward_table, reverse_table = block.tables(h)
        forward_sums, reverse_sums = h.new_zeros(h.shape), h.new_zeros(h.shape)
        for chunk in chunks:
            channels = edge_channels(normalised(chunk, view, edge_scale, h.dtype))
            nodes, sums = block_sums(channels, forward_table, chunk.src, chunk.dst)
            forward_sums = forward_sums.index_add(0, nodes, sums)
            nodes, sums = block_sums(channels, reverse_table, chunk.dst, chunk.src)
            reverse_sums = reverse_sums.index_add(0, nodes, sums)
        h = block.update_nodes(h, forward_sums, reverse_sums, incoming, outgoing)
    return h


def normalised(chunk, view, edge_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A chunk's weights divided by their layer's RMS, [rows, cols, k] in `dtype`."""
    return chunk.weights(view.edge_attr).to(dtype) / edge_scale[chunk.grid.layer]


def linear_decode_edges(metanet, view, chunks, edge_scale: torch.Tensor, h: torch.Tensor,
                        log_gate: torch.Tensor | None) -> torch.Tensor:
    """The rewritten flat weights ``old + residual_scale * rewrite_gain * delta * rms`` (times
    the target's channel gate, when given), in the model's dtype."""
    factors = metanet.edge_decoder.factors(h)
    edge_attr = view.edge_attr
    pieces = []
    for chunk in chunks:
        if chunk.grid.k == 0:
            continue
        scale = edge_scale[chunk.grid.layer]
        values = normalised(chunk, view, edge_scale, h.dtype)
        delta = metanet.edge_decoder.decode_grid(factors, values, chunk.src, chunk.dst) * scale
        old = chunk.weights(edge_attr)
        new = old + (metanet.delta_scale() * delta).to(old.dtype)
        if log_gate is not None:
            new = new * log_gate[chunk.dst].exp().unsqueeze(-1)
        pieces.append(new.reshape(-1))
    return torch.cat(pieces) if pieces else edge_attr.new_zeros(0)
