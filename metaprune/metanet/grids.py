"""Message passing on a network graph's edge grids, chunk by chunk, in memory that scales with
the parameters.

A layer's edges are a dense grid (`metaprune.graph.EdgeGrid`: ``[out, in]`` edges carrying
``[out, in, k]`` weights; grouped and transposed convolutions, embeddings and identity edges
are grids too). So a node's aggregate over its incoming edges is a reduction along one axis of
the grid, not a scatter over an edge list, and no ``[num_edges, hidden]`` tensor is ever alive
for the whole model: every round walks the grids in chunks of rows (`CHUNK_ENTRIES` weights at
a time), reduces each chunk's messages to per-node partial statistics, and combines the
partials of all chunks once per round.

An edge's embedding after round t depends on its own weights and on the node embeddings of
the rounds before, so an edge state need not be kept between rounds: it is recomputed from the
weights (encoder, then the edge updates of the earlier rounds) unless it fits the cache budget
(`EdgeStates`). The result equals the edge-list formulation
(`metaprune.metanet.scatter_reference`) up to float rounding, and is differentiable.
"""

import math
from dataclasses import dataclass

import torch

from metaprune.graph import EdgeGrid, NetworkGraph, edge_grids
from metaprune.metanet.edges import entry_features
from metaprune.metanet.precision import amax, lowered

CHUNK_ENTRIES = 1 << 14  # weights (edges x k) per chunk: activations stay in the CPU's cache
# edge states kept between rounds instead of recomputed (`cache_budget`): at least 1 GiB, and
# 48 bytes per weight of the model, so memory stays proportional to the parameters (a
# ResNet-50: 1.2 GB; a ViT-B/16: 4.1 GB, 38 % of its fp32 states, 76 % in bf16). On a
# 3-block ViT-B (22 M edges), 48 B per weight against the former fixed 1 GiB scaled to its
# size (256 MiB): 34.6 -> 31.5 CPU s a forward (fp32, twice each, alternated).
MIN_CACHE_BYTES = 1 << 30
CACHE_BYTES_PER_WEIGHT = 48


@dataclass
class GraphView:
    """What the metanetwork reads of a graph: node features and weights as grids.

    Built by `GraphView.of` from a `NetworkGraph` (no edge list is built) or from its
    ``data`` / a PyG ``Batch`` of them (grids read from ``edge_index``).
    """

    x: torch.Tensor  # [num_nodes, NUM_NODE_FEATURES]
    x_param_mask: torch.Tensor  # [num_nodes, NUM_PARAM_SLOTS] bool
    node_layer: torch.Tensor  # [num_nodes] long
    edge_attr: torch.Tensor  # flat weights, grid after grid
    grids: list[EdgeGrid]
    batch: torch.Tensor | None  # graph of each node in a Batch, None for one graph

    @classmethod
    def of(cls, graph) -> "GraphView":
        if isinstance(graph, NetworkGraph):
            features, grids = graph.features, graph.edge_grids()
        else:
            features, grids = graph, edge_grids(graph)
        return cls(features.x, features.x_param_mask, features.layer.long(), features.edge_attr,
                   grids, getattr(features, "batch", None))

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    @property
    def num_layers(self) -> int:
        return int(self.node_layer.max()) + 1 if self.node_layer.numel() else 0


def cache_budget(view: GraphView) -> int:
    """Bytes of edge states `EdgeStates` may keep for this graph (see `MIN_CACHE_BYTES`)."""
    return max(MIN_CACHE_BYTES, CACHE_BYTES_PER_WEIGHT * view.edge_attr.numel())


@dataclass
class Chunk:
    """Rows ``start:stop`` of one grid, with their source and target node grids."""

    grid: EdgeGrid
    start: int
    stop: int
    src: torch.Tensor  # [rows or 1, cols or 1]
    dst: torch.Tensor

    @property
    def num_edges(self) -> int:
        return (self.stop - self.start) * self.grid.cols

    def weights(self, edge_attr: torch.Tensor) -> torch.Tensor:
        """[rows, cols, k] weights of the chunk (a view)."""
        return self.grid.attr(edge_attr)[self.start:self.stop]


def chunks_of(grids: list[EdgeGrid], chunk_entries: int = CHUNK_ENTRIES) -> list[Chunk]:
    """Every grid cut into runs of rows holding about `chunk_entries` weights (at least a row)."""
    chunks = []
    for grid in grids:
        per_row = grid.cols * max(grid.k, 1)
        step = max(1, chunk_entries // max(per_row, 1))
        for start in range(0, grid.rows, step):
            stop = min(start + step, grid.rows)
            chunks.append(Chunk(grid, start, stop, _rows(grid.src, start, stop),
                                _rows(grid.dst, start, stop)))
    return chunks


def _rows(nodes: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return nodes if nodes.shape[0] == 1 else nodes[start:stop]


def layer_weight_rms(view: GraphView, dtype: torch.dtype) -> torch.Tensor:
    """RMS of every layer's weights, [num_layers] (0 for layers without weights), in `dtype`."""
    num_layers = view.num_layers
    sums = torch.zeros(num_layers, dtype=dtype)
    counts = torch.zeros(num_layers, dtype=dtype)
    for grid in view.grids:
        if grid.k:
            sums[grid.layer] += grid.attr(view.edge_attr).to(dtype).square().sum()
            counts[grid.layer] += grid.num_edges * grid.k
    return (sums / counts.clamp_min(1)).sqrt()


class NodeAggregation:
    """Per-node aggregates of messages that arrive chunk by chunk (sum, mean, max, min, var,
    std, concatenated in the order given, as PyG's ``MultiAggregation(mode="cat")``).

    Each chunk's messages ``[rows, cols, hidden]`` are first reduced along the grid axes on
    which their target nodes are constant (a dense layer's inputs: one reduction along the
    row), leaving a few partial statistics per node; `result` combines them with one scatter.
    Nodes that receive nothing aggregate to 0, as in PyG.
    """

    def __init__(self, aggregations, num_nodes: int, dtype: torch.dtype = torch.float32):
        self.aggregations = list(aggregations)
        self.num_nodes = num_nodes
        # partials are kept and combined in `dtype` (the node embeddings'), whatever the
        # messages' dtype: a bf16 chunk's reduction accumulates in fp32 and is rounded once
        self.dtype = dtype
        self._nodes, self._count = [], []
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._last_target = None  # successive chunks of one grid reading the same row

    def _needs(self) -> set[str]:
        needs = set()
        for name in self.aggregations:
            needs.update({"sum": ["sum"], "mean": ["sum"], "max": ["max"], "min": ["min"],
                          "var": ["sum", "square"], "std": ["sum", "square"]}[name])
        return needs

    def add(self, messages: torch.Tensor, target: torch.Tensor) -> None:
        """Messages [rows, cols, hidden] to the nodes of `target` ([rows or 1, cols or 1])."""
        axes = tuple(axis for axis in (0, 1)
                     if target.shape[axis] == 1 and messages.shape[axis] > 1)
        count = math.prod(messages.shape[axis] for axis in axes)
        reduced = {}
        for stat in self._needs():
            if stat == "sum":
                value = messages.sum(axes, keepdim=True) if axes else messages
            elif stat == "square":
                square = messages.to(self.dtype).square()
                value = square.sum(axes, keepdim=True) if axes else square
            elif stat == "max":
                value = amax(messages, axes) if axes else messages
            else:
                value = messages.amin(axes, keepdim=True) if axes else messages
            reduced[stat] = value.reshape(-1, messages.shape[-1]).to(self.dtype)
        shape = next(iter(reduced.values())).shape[0]
        nodes = target.expand(*(1 if axis in axes else messages.shape[axis]
                                for axis in (0, 1))).reshape(-1)
        if nodes.numel() != shape:
            raise AssertionError("target grid does not match the messages")
        if target is self._last_target and 0 in axes:
            # the next rows of the same grid, into the same nodes: fold into the last partial,
            # so partials stay as many as the grids' columns, not columns x chunks
            self._count[-1] = self._count[-1] + count
            for stat, value in reduced.items():
                last = self._parts[stat][-1]
                self._parts[stat][-1] = {"max": torch.maximum, "min": torch.minimum}.get(
                    stat, torch.add)(last, value)
            return
        self._last_target = target
        self._nodes.append(nodes)
        self._count.append(torch.full((shape,), float(count), dtype=self.dtype))
        for stat, value in reduced.items():
            self._parts.setdefault(stat, []).append(value)

    def result(self, like: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        """[num_nodes, len(aggregations) * hidden] (`like`: dtype and hidden width).

        `shift` ([hidden]) is added to every message first, as it were: sum gains count x
        shift, mean, max and min gain shift (nodes without messages stay 0), var and std are
        unchanged. So a layer's last bias costs a per-node add, not a per-edge one.
        """
        hidden, num = like.shape[-1], self.num_nodes
        nodes = torch.cat(self._nodes) if self._nodes else like.new_zeros(0, dtype=torch.long)
        count = like.new_zeros(num).index_add(0, nodes, torch.cat(self._count).to(like.dtype)) \
            if self._nodes else like.new_zeros(num)
        stats = {}
        for stat, parts in self._parts.items():
            values = torch.cat(parts)
            if stat in ("sum", "square"):
                stats[stat] = like.new_zeros(num, hidden).index_add(0, nodes, values)
            else:
                index = nodes.unsqueeze(1).expand_as(values)
                stats[stat] = like.new_zeros(num, hidden).scatter_reduce(
                    0, index, values, "amax" if stat == "max" else "amin", include_self=False)
        for stat in self._needs():  # no messages at all
            stats.setdefault(stat, like.new_zeros(num, hidden))
        denominator = count.clamp_min(1).unsqueeze(1)
        reached = shift * (count > 0).to(like.dtype).unsqueeze(1) if shift is not None else 0
        out = []
        for name in self.aggregations:
            if name == "sum":
                out.append(stats[name] if shift is None
                           else stats[name] + count.unsqueeze(1) * shift)
            elif name in ("max", "min"):
                out.append(stats[name] + reached)
            elif name == "mean":
                out.append(stats["sum"] / denominator + reached)
            else:
                mean = stats["sum"] / denominator
                var = stats["square"] / denominator - mean * mean
                if name == "var":
                    out.append(var)
                else:  # as PyG's StdAggregation: an undefined gradient at sqrt(0) avoided
                    std = var.clamp(min=1e-5).sqrt()
                    out.append(std.masked_fill(std <= math.sqrt(1e-5), 0.0))
        return torch.cat(out, dim=-1)


class EdgeStates:
    """The edge embedding of every chunk at any round, recomputed or cached.

    ``state(chunk, t)`` is the embedding after ``t`` edge updates: the encoder's output,
    then ``blocks[s].update_edges`` with the node embeddings after round ``s`` for s < t.
    Edge states live in `edge_dtype` (see `metaprune.metanet.precision`): the per-edge work
    runs in `lowered`, the metanetwork in that dtype; per-node terms come from `metanet`.
    Chunks are cached while their states fit `cache_bytes`, those with the longest kernels
    (the dearest to re-encode) first, then in order; the others are
    recomputed from their weights each round, so memory stays proportional to the parameters
    for any model.
    """

    def __init__(self, metanet, view: GraphView, chunks: list[Chunk], edge_scale: torch.Tensor,
                 dtype: torch.dtype, cache_bytes: int, edge_dtype: torch.dtype | None = None):
        self.metanet = metanet
        self.view = view
        self.edge_scale = edge_scale  # [num_layers], the layer's weight RMS
        self.dtype = dtype
        self.edge_dtype = edge_dtype or dtype
        self.lowered = lowered(metanet, self.edge_dtype)
        self._update_terms = []  # per round: `BidirectionalBlock.update_terms` of its h
        self._cache: dict[int, tuple[torch.Tensor, int]] = {}
        hidden = metanet.config["hidden"]
        element = torch.finfo(self.edge_dtype).bits // 8
        budget, self._cached = cache_bytes, set()
        # the dearest to recompute first: a k-entry kernel costs the encoder k entries an edge
        by_cost = sorted(range(len(chunks)), key=lambda index: -chunks[index].grid.k)
        for index in by_cost:
            size = chunks[index].num_edges * hidden * element
            if size <= budget:
                self._cached.add(index)
                budget -= size

    def end_round(self, t: int, h: torch.Tensor) -> None:
        """Round t is over, its node embeddings are `h`: edges may move past it."""
        self._update_terms.append(self.metanet.blocks[t].update_terms(h).to(self.edge_dtype))

    def values(self, chunk: Chunk) -> torch.Tensor:
        """The chunk's weights divided by the layer's RMS (in the metanetwork's dtype), in the
        edge dtype."""
        scale = self.edge_scale[chunk.grid.layer]
        return (chunk.weights(self.view.edge_attr).to(self.dtype) / scale).to(self.edge_dtype)

    def state(self, index: int, chunk: Chunk, t: int) -> torch.Tensor:
        e, at = self._cache.get(index, (None, 0))
        if e is None:
            e = self.lowered.edge_encoder.encode_grid(self.values(chunk), chunk.grid.k)
        for s in range(at, t):
            e = self.lowered.blocks[s].grid_update_edges(self._update_terms[s], chunk.src,
                                                         chunk.dst, e)
        if index in self._cached:
            self._cache[index] = (e, t)
        return e


def aggregate_round(metanet, states: EdgeStates, chunks: list[Chunk], t: int,
                    h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round t's forward (along the edges) and reverse aggregates, each [nodes, A * hidden]."""
    block = metanet.blocks[t]
    aggregations = metanet.config["aggregations"]
    forward = NodeAggregation(aggregations, h.shape[0], h.dtype)
    reverse = NodeAggregation(aggregations, h.shape[0], h.dtype)
    terms = block.message_terms(h).to(states.edge_dtype)
    edge_block = states.lowered.blocks[t]
    for index, chunk in enumerate(chunks):
        e = states.state(index, chunk, t)
        to_dst, to_src = edge_block.grid_messages(terms, chunk.src, chunk.dst, e)
        forward.add(to_dst, chunk.dst)
        reverse.add(to_src, chunk.src)
    forward_bias, reverse_bias = block.message_biases()
    return forward.result(h, forward_bias), reverse.result(h, reverse_bias)


def decode_edges(metanet, states: EdgeStates, chunks: list[Chunk], t: int,
                 log_gate: torch.Tensor | None) -> torch.Tensor:
    """The rewritten flat weights: ``old + residual_scale * rewrite_gain * delta`` (times the
    channel gate of the edge's target, when given), chunk by chunk, in the model's dtype."""
    edge_attr = states.view.edge_attr
    grad = torch.is_grad_enabled() and any(p.requires_grad for p in metanet.parameters())
    out = None if grad else torch.empty_like(edge_attr)
    pieces = []
    for index, chunk in enumerate(chunks):
        if chunk.grid.k == 0:
            continue
        e = states.state(index, chunk, t)
        scale = states.edge_scale[chunk.grid.layer]
        delta = states.lowered.edge_decoder.decode_grid(e, states.values(chunk), scale)
        delta = delta.to(states.dtype)  # the rewrite adds in fp32 whatever the edge dtype
        old = chunk.weights(edge_attr)
        new = old + (metanet.delta_scale() * delta).to(old.dtype)
        if log_gate is not None:
            new = new * log_gate[chunk.dst].exp().unsqueeze(-1)
        if out is None:
            pieces.append(new.reshape(-1))
        else:
            start = chunk.grid.attr_start + chunk.start * chunk.grid.cols * chunk.grid.k
            out[start:start + new.numel()] = new.reshape(-1)
    if out is not None:
        return out
    return torch.cat(pieces) if pieces else edge_attr.new_zeros(0)

