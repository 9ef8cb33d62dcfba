"""Accumulates nodes, edges and the parameter <-> feature records while a model is traced.

The builder knows nothing about operators: the rules in `metaprune.graph.rules` call it to
allocate channel nodes, add a block of edges read from a weight, or put a per-channel parameter
into a node slot. Every call is vectorised over a whole layer.
"""

import bisect
from dataclasses import dataclass, field

import torch

from metaprune.errors import UnsupportedModelError
from metaprune.graph.features import NODE_KINDS, NORM_KINDS, SLOT


@dataclass
class LayerInfo:
    """One layer of the layer-level graph: a set of channel nodes created by one rule."""

    name: str  # module path (``fc``), or a derived name (``input.0``, ``layer1.0:add#3``)
    kind: str  # one of `features.NODE_KINDS`
    module_type: str  # class name of the module, or the traced operator for merges
    first_node: int  # nodes of this layer are first_node .. first_node + num_nodes - 1
    num_nodes: int
    kernel_numel: int = 1  # weights per (input, output) channel pair of the creating layer
    grouped: bool = False  # convolution with groups > 1
    channelwise: bool = False  # output channel j reads input channel j only (depthwise)
    norms: list[str] = field(default_factory=list)  # normalisation modules folded into it
    params: list[str] = field(default_factory=list)  # parameter/buffer names read into the graph
    # tied weights: parameter of this layer -> the parameter whose edges carry the values (its
    # own edges are featureless, k = 0; see `GraphBuilder.add_weight_edges`)
    tied: dict[str, str] = field(default_factory=dict)


@dataclass
class EdgeBlock:
    """A block of edges laid out as a grid, with features read from one weight tensor.

    The edges are the broadcast of `src_grid` and `dst_grid` (2-d, e.g. ``[1, C]`` input nodes
    against ``[R, 1]`` output nodes), flattened row-major: a dense layer's edges are never
    materialised before the graph is assembled. Their features are a slice of the weight viewed
    as ``[rows, cols, kernel]`` (rows ``row_start:row_stop``), each edge taking the next run of
    `edge_k` entries. When ``col_perm`` is given the slice is ``weight[rows][:, col_perm, :]``
    (columns sorted by the input node they belong to, for flatten->Linear).
    """

    param: str  # parameter name in the module, e.g. ``features.0.weight`` ("" for identity)
    view: tuple[int, int, int]  # (rows, cols, kernel) view of the weight
    row_start: int
    row_stop: int
    col_perm: torch.Tensor | None
    edge_k: int  # feature length of each edge in this block
    layer: int  # index into `GraphBuilder.layers` (the layer owning the edges)
    src_grid: torch.Tensor  # source nodes, broadcastable against dst_grid
    dst_grid: torch.Tensor  # target nodes
    sources: torch.Tensor  # the distinct source nodes (small), for the layer DAG
    weight: torch.Tensor | None  # the weight itself (a reference, read at assembly)
    attr_offset: int = -1  # start in the flat `edge_attr`, set when the graph is assembled
    tied: str = ""  # for a featureless block of a tied weight: that weight's name in this layer

    @property
    def grid_shape(self) -> tuple[int, int]:
        return tuple(torch.broadcast_shapes(self.src_grid.shape, self.dst_grid.shape))

    @property
    def num_edges(self) -> int:
        rows, cols = self.grid_shape
        return rows * cols

    @property
    def numel(self) -> int:
        return (self.row_stop - self.row_start) * self.view[1] * self.view[2]


@dataclass
class NodeSlot:
    """A 1-D parameter or buffer stored in slot `slot` of `nodes` (entry c -> nodes[c])."""

    name: str
    nodes: torch.Tensor
    slot: int


class GraphBuilder:
    """Growing lists of layers, edge blocks and slot records (see `metaprune.graph.rules`)."""

    def __init__(self):
        self.num_nodes = 0
        self.layers: list[LayerInfo] = []
        self.blocks: list[EdgeBlock] = []
        self.slots: list[NodeSlot] = []
        self.slot_values: list[torch.Tensor] = []
        self.norm_kind_of: list[tuple[torch.Tensor, int]] = []  # (nodes, NORM_KINDS index)
        # Norm slots already used, so a second normalisation of the same channels gets nodes
        # of its own instead of overwriting the first one.
        self._norm_taken: set[int] = set()
        self._merge_count = 0
        self._first_nodes: list[int] = []  # first node of each layer, ascending
        self._weight_owner: dict[int, str] = {}  # id(weight tensor) -> first parameter name
        # Channel coupling the edges do not show (read by the pruner, not part of `data`):
        # pairs of equally shaped node tensors whose entries must be removed together
        # (attention contractions, heads, groups), and nodes that can never be removed.
        self.couplings: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.pinned: list[torch.Tensor] = []
        # (module path, one node per head) of every attention product's head axis
        self.head_splits: list[tuple[str, torch.Tensor]] = []

    # -- nodes ---------------------------------------------------------------------------
    def add_layer(self, name: str, kind: str, module_type: str, num_nodes: int, **info) -> int:
        """Create a layer with `num_nodes` fresh channel nodes; returns its layer index."""
        if kind not in NODE_KINDS:
            raise ValueError(f"unknown node kind {kind!r}")
        layer = LayerInfo(name, kind, module_type, self.num_nodes, num_nodes, **info)
        self.layers.append(layer)
        self._first_nodes.append(self.num_nodes)
        self.num_nodes += num_nodes
        return len(self.layers) - 1

    def layer_of_node(self, node: int) -> int:
        return bisect.bisect_right(self._first_nodes, node) - 1

    def nodes_of(self, layer: int) -> torch.Tensor:
        info = self.layers[layer]
        return torch.arange(info.first_node, info.first_node + info.num_nodes)

    def fill_unknown(self, labels: torch.Tensor, owner: str) -> torch.Tensor:
        """Replace the -1 entries of `labels` (features of no known channel) by fresh nodes."""
        missing = labels < 0
        count = int(missing.sum())
        if count == 0:
            return labels
        layer = self.add_layer(f"{owner}.positions", "position", "position", count)
        labels = labels.clone()
        labels[missing] = self.nodes_of(layer)
        return labels

    def drop_layers(self, drop: set[int], output_nodes: torch.Tensor) -> torch.Tensor:
        """Remove layers that own no edge and feed nothing; renumber nodes and layers.

        Returns `output_nodes` renumbered, without those of dropped layers.
        """
        keep = torch.ones(self.num_nodes, dtype=torch.bool)
        for layer in drop:
            info = self.layers[layer]
            keep[info.first_node:info.first_node + info.num_nodes] = False
        new_node = torch.cumsum(keep.long(), 0) - 1
        new_layer = {}
        layers, first = [], 0
        for index, info in enumerate(self.layers):
            if index in drop:
                continue
            new_layer[index] = len(layers)
            info.first_node = first
            first += info.num_nodes
            layers.append(info)
        for block in self.blocks:
            block.src_grid, block.dst_grid = new_node[block.src_grid], new_node[block.dst_grid]
            block.sources = new_node[block.sources]
            block.layer = new_layer[block.layer]
        for slot in self.slots:
            slot.nodes = new_node[slot.nodes]
        self.norm_kind_of = [(new_node[nodes], kind) for nodes, kind in self.norm_kind_of]
        gone = torch.where(keep, new_node, torch.full_like(new_node, -1))
        self.couplings = [(gone[a], gone[b]) for a, b in self.couplings]
        self.pinned = [gone[nodes] for nodes in self.pinned]
        self.head_splits = [(where, gone[nodes]) for where, nodes in self.head_splits]
        self.layers = layers
        self._first_nodes = [info.first_node for info in layers]
        self.num_nodes = first
        return new_node[output_nodes[keep[output_nodes]]]

    # -- parameters ----------------------------------------------------------------------
    def add_slot(self, layer: int, name: str, value: torch.Tensor, nodes: torch.Tensor, slot: str):
        """Store the 1-D tensor `value` (parameter/buffer `name`) in slot `slot` of `nodes`."""
        value = value.detach()
        if value.dim() != 1 or value.numel() != nodes.numel():
            raise UnsupportedModelError(
                f"{name} has shape {tuple(value.shape)}, expected one entry per channel "
                f"({nodes.numel()})"
            )
        self.slots.append(NodeSlot(name, nodes, SLOT[slot]))
        self.slot_values.append(value.clone())
        self.layers[layer].params.append(name)

    def norm_slots_free(self, nodes: torch.Tensor) -> bool:
        return not any(int(n) in self._norm_taken for n in nodes.tolist())

    def take_norm_slots(self, nodes: torch.Tensor, norm_kind: str):
        self._norm_taken.update(nodes.tolist())
        self.norm_kind_of.append((nodes, NORM_KINDS.index(norm_kind)))

    def add_weight_edges(
        self,
        layer: int,
        param: str,
        weight: torch.Tensor,
        view: tuple[int, int, int],
        src_grid: torch.Tensor,
        dst_grid: torch.Tensor,
        sources: torch.Tensor,
        *,
        rows: tuple[int, int] | None = None,
        col_perm: torch.Tensor | None = None,
    ):
        """Add the edges of grid `src_grid` x `dst_grid` carrying weights of `weight`.

        Edge e (row-major in the broadcast grid) carries the e-th run of k entries of
        ``weight.view(view)[rows]`` (columns permuted by `col_perm`), k = entries / edges.
        """
        row_start, row_stop = rows if rows is not None else (0, view[0])
        owner = self._weight_owner.setdefault(id(weight), param)
        if owner != param:
            # A tied weight (an LM head sharing the token embedding): its values are stored
            # once, in the first layer's edges; this layer's edges show the connectivity only.
            self.layers[layer].tied[param] = owner
            self.blocks.append(EdgeBlock("", (0, 0, 0), 0, 0, None, 0, layer, src_grid,
                                         dst_grid, sources, None, tied=param))
            return
        block = EdgeBlock(param, view, row_start, row_stop, col_perm, 0, layer,
                          src_grid, dst_grid, sources, weight)
        block.edge_k = block.numel // block.num_edges
        if block.edge_k * block.num_edges != block.numel:
            raise AssertionError(f"{param}: {block.numel} weights for {block.num_edges} edges")
        self.blocks.append(block)
        if param not in self.layers[layer].params:  # attention: three blocks of in_proj
            self.layers[layer].params.append(param)

    def add_identity_edges(self, layer: int, src: torch.Tensor, dst: torch.Tensor):
        """Edges without parameters (residual add, gating product, unfoldable norm copy)."""
        keep = src >= 0
        src, dst = src[keep], dst[keep]
        if src.numel():
            self.blocks.append(EdgeBlock("", (0, 0, 0), 0, 0, None, 0, layer, src[None],
                                         dst[None], src, None))

    def couple(self, left: torch.Tensor, right: torch.Tensor):
        """Record that node ``left[i]`` and ``right[i]`` go together (broadcast, -1 ignored)."""
        left, right = torch.broadcast_tensors(left, right)
        keep = (left >= 0) & (right >= 0)
        if bool(keep.any()):
            self.couplings.append((left[keep].reshape(-1), right[keep].reshape(-1)))

    def pin(self, nodes: torch.Tensor):
        """Nodes whose channels an operator consumes in a way no removal can follow."""
        nodes = nodes.reshape(-1)
        nodes = torch.unique(nodes[nodes >= 0])
        if nodes.numel():
            self.pinned.append(nodes)

    # -- elementwise combinations ------------------------------------------------------------
    def merge(self, left: torch.Tensor, right: torch.Tensor, op: str, where: str) -> torch.Tensor:
        """Channels of an elementwise combination of two differently labelled tensors.

        `left` and `right` are broadcastable label planes. One new node is created per distinct
        (left, right) pair, with an identity edge from each side: a residual add of C channels
        gives C nodes and 2C edges, never a dense block.
        """
        left, right = torch.broadcast_tensors(left, right)
        base = self.num_nodes + 2
        key = (left + 1) * base + (right + 1)
        unique_keys, inverse = torch.unique(key, return_inverse=True)
        kind = {"add": "merge_add", "sub": "merge_add", "mul": "merge_mul", "div": "merge_mul"}
        self._merge_count += 1
        layer = self.add_layer(
            f"{where}:{op}#{self._merge_count}" if where else f"{op}#{self._merge_count}",
            kind.get(op, "merge_other"),
            op,
            unique_keys.numel(),
        )
        nodes = self.nodes_of(layer)
        self.add_identity_edges(layer, unique_keys // base - 1, nodes)
        self.add_identity_edges(layer, unique_keys % base - 1, nodes)
        return (inverse + self.layers[layer].first_node).reshape(left.shape)
