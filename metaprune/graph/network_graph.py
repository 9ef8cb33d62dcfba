"""`NetworkGraph`: the neuron-level PyG graph of a network, its layer DAG, and the exact inverse."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import networkx as nx
import torch
from torch import nn

from metaprune.graph.builder import EdgeBlock, GraphBuilder, LayerInfo, NodeSlot
from metaprune.graph.planes import compress
from metaprune.graph.features import (
    KIND_OFFSET,
    NODE_KINDS,
    NORM_OFFSET,
    NUM_NODE_FEATURES,
    NUM_PARAM_SLOTS,
    SCALAR,
)


PARAMETRISED_KINDS = ("conv", "conv_transpose", "linear", "embedding", "attention_in")


@dataclass
class EdgeGroup:
    """Edges whose features all have length `k` (a view into the flat `edge_attr`)."""

    k: int  # weights per edge (0: identity edges without parameters)
    edges: slice  # their columns in `data.edge_index`
    attr: torch.Tensor  # [num_edges_in_group, k] view of the flat edge features


class GraphFeatures:
    """The graph's tensors (``x``, ``edge_attr``, ``layer``, ...) before any PyG object exists.

    `NetworkGraph.data` / `.features` turn them into a `NetworkData` (PyG) on first access, so
    code that only reads tensors or couplings never imports torch-geometric.
    """

    def __init__(self, **tensors) -> None:
        self.__dict__.update(tensors)


def edge_groups(data, edge_attr: torch.Tensor | None = None) -> list[EdgeGroup]:
    """Views of the flat edge features, one per group of equal feature length.

    Works on one graph's data and on a `torch_geometric.data.Batch` of them alike.
    """
    edge_attr = data.edge_attr if edge_attr is None else edge_attr
    groups, edge_start, attr_start = [], 0, 0
    for k, count in zip(data.edge_group_k.tolist(), data.edge_group_size.tolist()):
        attr = edge_attr[attr_start:attr_start + k * count].view(count, k)
        groups.append(EdgeGroup(k, slice(edge_start, edge_start + count), attr))
        edge_start += count
        attr_start += k * count
    return groups


@dataclass
class EdgeGrid:
    """A block of edges laid out as a grid: a layer's weight, or a run of identity edges.

    Edge ``(r, c)`` of the ``rows x cols`` grid goes from node ``src[r, c]`` to node
    ``dst[r, c]`` (`src` and `dst` broadcast to the grid: a dense layer's `src` is ``[1, in]``
    and its `dst` ``[out, 1]``) and carries the `k` weights ``attr(edge_attr)[r, c]``. Its
    edges are ``edge_start .. edge_start + rows * cols - 1`` of ``data.edge_index``, row-major,
    so a layer's messages can be reduced along an axis of the grid instead of scattered.
    """

    rows: int
    cols: int
    k: int  # weights per edge (0: identity edges)
    layer: int  # the layer owning the edges (the targets' layer)
    src: torch.Tensor  # [rows or 1, cols or 1] source nodes
    dst: torch.Tensor  # [rows or 1, cols or 1] target nodes
    edge_start: int  # first column in `data.edge_index`
    attr_start: int  # first entry in the flat `edge_attr`

    @property
    def num_edges(self) -> int:
        return self.rows * self.cols

    def attr(self, edge_attr: torch.Tensor) -> torch.Tensor:
        """The grid's weights as a ``[rows, cols, k]`` view of the flat `edge_attr`."""
        numel = self.num_edges * self.k
        return edge_attr[self.attr_start:self.attr_start + numel].view(self.rows, self.cols,
                                                                         self.k)


def edge_grids(data) -> list[EdgeGrid]:
    """The edge grids of a graph's data or of a PyG `Batch` of them, in edge order.

    Read from ``data.edge_grid_shape`` (rows, cols, k of each grid) and ``edge_index`` (so this
    materialises `NetworkGraph.data`; `NetworkGraph.edge_grids()` does not).
    """
    grids, edge_start, attr_start = [], 0, 0
    for rows, cols, k in data.edge_grid_shape.tolist():
        count = rows * cols
        src, dst = data.edge_index[:, edge_start:edge_start + count].view(2, rows, cols)
        grids.append(EdgeGrid(rows, cols, k, int(data.edge_layer[edge_start]), compress(src),
                              compress(dst), edge_start, attr_start))
        edge_start += count
        attr_start += count * k
    return grids


class NetworkGraph:
    """A network as a graph of channels (nodes) and weights (edges), exactly invertible.

    Build it with `metaprune.graph.to_graph`. The feature layout is documented in
    `metaprune.graph.features`.

    Attributes:
        data: a `torch_geometric.data.Data` with ``x`` [num_nodes, NUM_NODE_FEATURES],
            ``edge_index`` [2, num_edges] (edges grouped by feature length), ``edge_attr`` (flat,
            see `edge_groups`), ``edge_group_k`` / ``edge_group_size`` (the group layout: feature
            length and edge count of each consecutive group), ``edge_layer`` (int32, the layer
            owning each edge), ``layer`` (the layer of each node, index into `layers`),
            ``x_param_mask`` (which of the `PARAM_SLOTS` of each node were read from a
            parameter) and ``edge_grid_shape`` (rows, cols, k of every `EdgeGrid`, in edge
            order). Built on first access: ``edge_index`` costs 20 bytes an edge; `x`,
            `edge_attr`, `features` and `edge_grids` give the rest without it.
        layers: one `LayerInfo` per node-owning layer (name, kind, nodes, folded norms).
        side_parameters: parameters that are not graph features (free parameters such as class
            tokens and positional embeddings, parameters the forward pass never used), restored
            as they are by `write_back`.

    Example::

        graph = to_graph(model, (torch.randn(1, 3, 32, 32),))
        graph.num_nodes, graph.num_edges
        for group in graph.edge_groups():      # one MLP per kernel size in a metanetwork
            new_attr = group.attr * 0.5         # [edges_in_group, k]
        for grid in graph.edge_grids():        # a layer's weights as a [out, in, k] block
            grid.attr(graph.edge_attr).shape
        same = graph.write_back()               # bit-identical copy of `model`
    """

    def __init__(
        self,
        source: nn.Module,  # the converted module (kept by reference; never modified)
        features: GraphFeatures,  # everything of `data` but ``edge_index`` / ``edge_layer``
        layers: list[LayerInfo],
        blocks: list[EdgeBlock],  # every edge block, in edge order, with flat offsets
        slots: list[NodeSlot],
        side_parameters: dict[str, torch.Tensor],
        notes: list[str],  # caveats found during conversion (e.g. unused parameters)
        layer_links: list[tuple[int, int]],  # (source layer, target layer) pairs of the DAG
    ):
        self._source = source
        self._features = features
        self.layers = layers
        self._edge_blocks = blocks
        self._blocks = [b for b in blocks if b.param]
        self._slots = slots
        self.side_parameters = side_parameters
        self.notes = notes
        self._layer_links = layer_links
        tensors = dict(source.named_parameters(remove_duplicate=False))
        tensors.update(source.named_buffers(remove_duplicate=False))
        self._shapes = {name: tuple(tensors[name].shape) for name in self.feature_parameters}
        self._layer_dag = None
        self._edge_index_built = False

    def _pyg_features(self):
        """The features as a `NetworkData` (imports torch-geometric the first time)."""
        if isinstance(self._features, GraphFeatures):
            from metaprune.graph.pyg_data import NetworkData

            tensors = dict(vars(self._features))
            num_nodes = tensors.pop("num_nodes")
            data = NetworkData(num_nodes=num_nodes)
            for key, value in tensors.items():
                setattr(data, key, value)
            self._features = data
        return self._features

    @property
    def data(self):
        """The PyG `Data` (see the class docstring), its ``edge_index`` built on first access.

        A dense layer's edges are a grid (`edge_grids`); listing them one by one costs 20 bytes
        an edge (15 M edges on a ResNet-50), so the metanetwork, `parameters` and `write_back`
        never ask for it: only code that wants the edge list (the group-sparsity regulariser,
        `coupled_channels`, users) pays for it.
        """
        features = self._pyg_features()
        if not self._edge_index_built:
            features.edge_index, features.edge_layer = _edge_lists(
                self._edge_blocks, self.num_edges)
            self._edge_index_built = True
        return features

    @property
    def x(self) -> torch.Tensor:
        """Node features ``[num_nodes, NUM_NODE_FEATURES]`` (``data.x``, without building it)."""
        return self._features.x

    @property
    def edge_attr(self) -> torch.Tensor:
        """The flat edge features (``data.edge_attr``, without building ``data``)."""
        return self._features.edge_attr

    @property
    def features(self):
        """``data`` without ``edge_index`` / ``edge_layer``: what the metanetwork reads."""
        return self._pyg_features()

    @property
    def num_nodes(self) -> int:
        return int(self._features.num_nodes)

    @property
    def num_edges(self) -> int:
        return sum(block.num_edges for block in self._edge_blocks)

    def edge_grids(self) -> list[EdgeGrid]:
        """Every block of edges as a grid (see `EdgeGrid`), in edge order, no edge list built."""
        grids, edge_start = [], 0
        for block in self._edge_blocks:
            rows, cols = block.grid_shape
            grids.append(EdgeGrid(rows, cols, block.edge_k, block.layer, block.src_grid,
                                  block.dst_grid, edge_start, block.attr_offset))
            edge_start += block.num_edges
        return grids

    @property
    def feature_parameters(self) -> list[str]:
        """Names of the parameters and buffers whose entries are node or edge features."""
        names = dict.fromkeys(slot.name for slot in self._slots)
        names.update(dict.fromkeys(block.param for block in self._blocks))
        return list(names)

    def edge_groups(self, edge_attr: torch.Tensor | None = None) -> list[EdgeGroup]:
        """The edge groups of `edge_attr` (default: the graph's own features), as views."""
        return edge_groups(self._features, edge_attr)

    def coupled_channels(self) -> torch.Tensor:
        """Component id of each node: channels that can only be kept or removed together.

        Channels are coupled through identity edges (residual adds, gating products, norm
        copies) and channel-wise layers (depthwise convolutions). Ids are 0..components-1.
        """
        data = self.data
        channelwise = torch.tensor([layer.channelwise for layer in self.layers] + [False])
        tied = torch.tensor([bool(layer.tied) for layer in self.layers] + [False])
        identity = torch.zeros(self.num_edges, dtype=torch.bool)
        for group in self.edge_groups():
            if group.k == 0:
                identity[group.edges] = True
        identity &= ~tied[data.edge_layer.long()]  # a tied weight's featureless edges
        coupled = identity | channelwise[data.edge_layer.long()]
        src, dst = data.edge_index[:, coupled]
        component = torch.arange(self.num_nodes)
        while True:  # min-label propagation: as many rounds as the longest coupling chain
            low = torch.minimum(component[src], component[dst])
            new = component.scatter_reduce(0, src, low, "amin")
            new = new.scatter_reduce(0, dst, low, "amin")
            if torch.equal(new, component):
                return torch.unique(component, return_inverse=True)[1]
            component = new

    def coupled_layers(self) -> list[list[str]]:
        """Parametrised layers grouped by coupled output channels (from `coupled_channels`).

        Each group lists the layers (convolutions, linears, embeddings, attention projections)
        owning at least one channel of a coupled component: e.g. a ResNet stage's stem or
        projection plus every block's last convolution.
        """
        component = self.coupled_channels()
        parent: dict[str, str] = {}  # union-find over layer names

        def root(name: str) -> str:
            while parent[name] != name:
                parent[name] = parent[parent[name]]
                name = parent[name]
            return name

        first_layer: dict[int, str] = {}  # component -> a layer seen in it
        for layer in self.layers:
            if layer.kind not in PARAMETRISED_KINDS:
                continue
            parent.setdefault(layer.name, layer.name)
            nodes = component[layer.first_node:layer.first_node + layer.num_nodes]
            for c in torch.unique(nodes).tolist():
                other = first_layer.setdefault(c, layer.name)
                parent[root(layer.name)] = root(other)
        groups: dict[str, list[str]] = {}
        for name in parent:  # layers in graph order
            groups.setdefault(root(name), []).append(name)
        return sorted(groups.values(), key=lambda names: (-len(names), names))

    @property
    def layer_dag(self) -> nx.DiGraph:
        """Layer-level DAG: one vertex per layer (attributes from `LayerInfo`), data-flow edges."""
        if self._layer_dag is None:
            self._layer_dag = _layer_dag(self.layers, self._layer_links)
        return self._layer_dag

    def parameters(
        self, x: torch.Tensor | None = None, edge_attr: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The feature-carried parameters and buffers, rebuilt from `x` / `edge_attr`.

        Differentiable in the features (views and gathers only), so a metanetwork can train
        through ``torch.func.functional_call(model, graph.parameters(x, e), inputs)``. Only the
        entries that came from parameters are read (``data.x_param_mask`` and every flat edge
        feature); structural columns are ignored. Side parameters are not included.
        """
        x = self.x if x is None else x
        edge_attr = self.edge_attr if edge_attr is None else edge_attr
        if tuple(x.shape) != tuple(self.x.shape):
            raise ValueError(f"x has shape {tuple(x.shape)}, expected {tuple(self.x.shape)}")
        if edge_attr.dim() != 1 or edge_attr.numel() != self.edge_attr.numel():
            raise ValueError(
                f"edge_attr must be flat with {self.edge_attr.numel()} entries "
                f"(got shape {tuple(edge_attr.shape)}); see NetworkGraph.edge_groups"
            )
        result = {
            slot.name: x[slot.nodes, slot.slot].reshape(self._shapes[slot.name])
            for slot in self._slots
        }
        pieces: dict[str, list] = {}
        for block in self._blocks:
            values = edge_attr[block.attr_offset:block.attr_offset + block.numel]
            values = values.view(block.row_stop - block.row_start, *block.view[1:])
            if block.col_perm is not None:  # undo the grouping of columns by input node
                values = values[:, torch.argsort(block.col_perm), :]
            pieces.setdefault(block.param, []).append((block.row_start, values))
        for name, parts in pieces.items():
            parts.sort(key=lambda part: part[0])
            whole = parts[0][1] if len(parts) == 1 else torch.cat([v for _, v in parts])
            result[name] = whole.reshape(self._shapes[name])
        return result

    def write_back(
        self, x: torch.Tensor | None = None, edge_attr: torch.Tensor | None = None
    ) -> nn.Module:
        """A new module whose parameters are read back from `x` / `edge_attr`.

        Feature-carried parameters come from `parameters(x, edge_attr)`, side parameters from
        the side store, everything else (other buffers, structure) from a deep copy of the source
        module, which is left untouched. The graph keeps the source by reference: modify it
        (e.g. prune it in place) only after the last `write_back`.
        """
        model = copy.deepcopy(self._source)
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(model.named_buffers(remove_duplicate=False))
        with torch.no_grad():
            for name, value in self.parameters(x, edge_attr).items():
                tensors[name].copy_(value.detach())
            for name, value in self.side_parameters.items():
                tensors[name].copy_(value)
        return model

    def __repr__(self) -> str:
        groups = ", ".join(
            f"k={k}: {n}" for k, n in zip(
                self._features.edge_group_k.tolist(), self._features.edge_group_size.tolist())
        )
        return (f"NetworkGraph(nodes={self.num_nodes}, edges={self.num_edges}, "
                f"layers={len(self.layers)}, edge groups {{{groups}}})")


def assemble(
    builder: GraphBuilder,
    source: nn.Module,
    dtype: torch.dtype,
    output_nodes: torch.Tensor,
    side_parameters: dict[str, torch.Tensor],
    notes: list[str],
) -> NetworkGraph:
    """Turn the builder's lists into the PyG `Data` and a `NetworkGraph`."""
    num_nodes = builder.num_nodes
    layers = builder.layers
    counts = torch.tensor([layer.num_nodes for layer in layers], dtype=torch.long)
    node_layer = torch.repeat_interleave(torch.arange(len(layers)), counts)

    # Edges grouped by feature length; within a group, blocks keep their creation order.
    blocks = sorted(builder.blocks, key=lambda block: block.edge_k)
    group_k, edge_ptr = [], [0]
    offset = 0
    for block in blocks:
        if not group_k or group_k[-1] != block.edge_k:
            group_k.append(block.edge_k)
            edge_ptr.append(edge_ptr[-1])
        block.attr_offset = offset
        offset += block.num_edges * block.edge_k
        edge_ptr[-1] += block.num_edges
    edge_attr = torch.empty(offset, dtype=dtype)
    for block in blocks:
        if block.weight is not None:
            target = edge_attr[block.attr_offset:block.attr_offset + block.numel]
            weights = block.weight.detach().reshape(block.view)[block.row_start:block.row_stop]
            if block.col_perm is not None:
                weights = weights[:, block.col_perm, :]
            target.view(weights.shape).copy_(weights)
    first_nodes = torch.tensor([layer.first_node for layer in layers], dtype=torch.long)
    links = set()
    for block in blocks:
        source_layers = torch.searchsorted(first_nodes, block.sources, right=True) - 1
        links.update((int(s), block.layer) for s in torch.unique(source_layers).tolist())

    x = torch.zeros(num_nodes, NUM_NODE_FEATURES, dtype=dtype)
    param_mask = torch.zeros(num_nodes, NUM_PARAM_SLOTS, dtype=torch.bool)
    for slot, value in zip(builder.slots, builder.slot_values):
        x[slot.nodes, slot.slot] = value.to(dtype)
        param_mask[slot.nodes, slot.slot] = True

    kind_ids = torch.tensor([NODE_KINDS.index(layer.kind) for layer in layers], dtype=torch.long)
    x[torch.arange(num_nodes), KIND_OFFSET + kind_ids[node_layer]] = 1
    x[:, NORM_OFFSET] = 1  # "none" until a folded norm says otherwise
    for nodes, norm_kind in builder.norm_kind_of:
        x[nodes, NORM_OFFSET] = 0
        x[nodes, NORM_OFFSET + norm_kind] = 1
    log_kernel = torch.tensor([math.log2(max(layer.kernel_numel, 1)) for layer in layers])
    grouped = torch.tensor([float(layer.grouped) for layer in layers])
    x[:, SCALAR["log2_kernel"]] = log_kernel[node_layer].to(dtype)
    x[:, SCALAR["grouped"]] = grouped[node_layer].to(dtype)
    x[:, SCALAR["is_input"]] = (kind_ids[node_layer] == NODE_KINDS.index("input")).to(dtype)
    x[output_nodes, SCALAR["is_output"]] = 1

    data = GraphFeatures(x=x, edge_attr=edge_attr, num_nodes=num_nodes)
    data.edge_grid_shape = torch.tensor(
        [[*block.grid_shape, block.edge_k] for block in blocks], dtype=torch.long
    ).reshape(-1, 3)
    data.edge_group_k = torch.tensor(group_k, dtype=torch.long)
    data.edge_group_size = torch.tensor(edge_ptr, dtype=torch.long).diff()
    data.layer = node_layer
    data.x_param_mask = param_mask
    graph = NetworkGraph(source, data, layers, blocks, builder.slots, side_parameters, notes,
                         sorted(links))
    depth = _layer_depths(graph.layer_dag, len(layers))
    x[:, SCALAR["depth"]] = (depth / max(float(depth.max()), 1.0))[node_layer].to(dtype)
    return graph


def _edge_lists(blocks: list[EdgeBlock], num_edges: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``edge_index`` [2, num_edges] and ``edge_layer`` (int32) of blocks in edge order,
    filled block by block in place (no per-layer edge list is materialised twice)."""
    edge_index = torch.empty(2, num_edges, dtype=torch.long)
    edge_layer = torch.empty(num_edges, dtype=torch.int32)
    start = 0
    for block in blocks:
        shape, count = block.grid_shape, block.num_edges
        edge_index[0, start:start + count].view(shape).copy_(block.src_grid.expand(shape))
        edge_index[1, start:start + count].view(shape).copy_(block.dst_grid.expand(shape))
        edge_layer[start:start + count] = block.layer
        start += count
    return edge_index, edge_layer


def _layer_dag(layers: list[LayerInfo], links: list[tuple[int, int]]) -> nx.DiGraph:
    dag = nx.DiGraph()
    for index, layer in enumerate(layers):
        dag.add_node(
            index, name=layer.name, kind=layer.kind, module_type=layer.module_type,
            num_nodes=layer.num_nodes, norms=list(layer.norms),
            tied=dict(layer.tied),  # a tied weight is an annotation, never an edge (no cycle)
        )
    dag.add_edges_from((a, b) for a, b in links if a != b)
    return dag


def _layer_depths(dag: nx.DiGraph, num_layers: int) -> torch.Tensor:
    depth = torch.zeros(num_layers)
    if not nx.is_directed_acyclic_graph(dag):
        return depth
    for layer in nx.topological_sort(dag):
        preds = [depth[p] for p in dag.predecessors(layer)]
        depth[layer] = max(preds) + 1 if preds else 0
    return depth
