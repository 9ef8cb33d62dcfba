"""Network <-> graph: channels are nodes, weights are edges, and the mapping is exactly invertible.

`to_graph(module, example_inputs)` traces one forward pass and returns a `NetworkGraph` whose
`.data` is a PyG `Data` (node features with a fixed width across architectures, edge features
grouped by kernel size) and whose `.write_back(x, edge_attr)` builds a new module from (possibly
rewritten) features. See `metaprune.graph.features` for the feature layout and
`metaprune.graph.rules` / `metaprune.graph.trace` for the one rule per operator kind.

Example::

    from metaprune.graph import PARAM_SLOTS, to_graph
    graph = to_graph(model, example_inputs)
    new_x = graph.data.x.clone()
    slots = new_x[:, :len(PARAM_SLOTS)]              # a view: per-channel parameter slots
    slots[graph.data.x_param_mask] *= 0.9            # only entries read from parameters
    new_edges = graph.data.edge_attr * 0.9           # every edge feature is a weight
    model_2 = graph.write_back(x=new_x, edge_attr=new_edges)
"""

from metaprune.graph.builder import LayerInfo
from metaprune.graph.convert import to_graph
from metaprune.graph.features import NODE_KINDS, NORM_KINDS, NUM_NODE_FEATURES, PARAM_SLOTS
from metaprune.graph.network_graph import (
    EdgeGrid,
    EdgeGroup,
    NetworkGraph,
    edge_grids,
    edge_groups,
)



def __getattr__(name):
    # NetworkData imports torch-geometric (seconds): only when someone asks for it.
    if name == "NetworkData":
        from metaprune.graph.pyg_data import NetworkData

        return NetworkData
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EdgeGrid",
    "EdgeGroup",
    "LayerInfo",
    "NODE_KINDS",
    "NORM_KINDS",
    "NUM_NODE_FEATURES",
    "NetworkData",
    "NetworkGraph",
    "PARAM_SLOTS",
    "edge_grids",
    "edge_groups",
    "to_graph",
]
