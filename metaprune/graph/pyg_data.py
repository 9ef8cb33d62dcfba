"""`NetworkData`: the PyG `Data` class of a network graph.

Kept apart from `network_graph` because importing torch-geometric costs seconds: a classic
prune traces the channel graph to read its couplings but never needs PyG, so `NetworkGraph`
builds this object only when `.data` or `.features` is first asked for.
"""

from torch_geometric.data import Data


class NetworkData(Data):
    """PyG `Data` of a network graph; batches keep layers of different graphs apart.

    The group layout (``edge_group_k``, ``edge_group_size``) needs no offset when graphs are
    batched: groups, edges and flat features are concatenated in the same order, so
    `edge_groups` of a `Batch` lists every graph's groups one after the other.
    """

    def __inc__(self, key, value, *args, **kwargs):
        if key in ("layer", "edge_layer"):
            return int(self.layer.max()) + 1 if self.layer.numel() else 0
        return super().__inc__(key, value, *args, **kwargs)
