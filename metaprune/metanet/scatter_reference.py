"""The metanetwork's forward pass on an edge list: PyG message passing with scatters.

This is the formulation the committed checkpoint was trained with, kept verbatim as the test
oracle of `MetaNetwork.forward` (which walks edge grids chunk by chunk instead): on small models
both agree to float rounding, outputs and gradients. It holds ``[num_edges, hidden]`` tensors
for the whole model, so use it on small graphs only.

Example::

    graph = to_graph(model, example_inputs)
    new_x, new_edge_attr, keep = scatter_forward(metanet, graph.data, speedup=2.0)
    torch.testing.assert_close(new_edge_attr, metanet(graph, speedup=2.0)[1])
"""

import torch

from metaprune.graph import edge_groups
from metaprune.metanet.edges import layer_weight_rms
from metaprune.metanet.network import NUM_SLOTS


def scatter_forward(metanet, data, speedup=None):
    """`MetaNetwork.forward` on ``data`` (a `NetworkGraph.data` or a `Batch`), edge list based.

    Returns ``(new_x, new_edge_attr, keep_ratios)`` like `MetaNetwork.forward`.
    """
    dtype = metanet.node_encoder[0].weight.dtype
    x, edge_attr = data.x.to(dtype), data.edge_attr.to(dtype)
    num_layers = int(data.layer.max()) + 1 if data.layer.numel() else 0
    node_layer = data.layer.long()
    with torch.no_grad():  # scales are normalisers, not something to learn through
        rms = layer_weight_rms(data, edge_attr, num_layers)
        edge_scale = rms[data.edge_layer.long()].clamp_min(1e-12)
    h, slot_scale = metanet._encode_nodes(x, data.x_param_mask, node_layer, rms)
    e = metanet.edge_encoder(data, edge_attr, edge_scale)
    for block in metanet.blocks:
        h, e = block(h, data.edge_index, e)

    new_slots = metanet._rewrite_slots(data.x, h, data.x_param_mask, slot_scale, node_layer)
    edge_delta = metanet.delta_scale() * metanet.edge_decoder(data, edge_attr, edge_scale, e)
    new_edge_attr = data.edge_attr + edge_delta.to(data.edge_attr.dtype)
    if metanet.gate_range > 0:
        log_gate = metanet._log_gate(data.x, h, new_slots.dtype)
        new_slots = metanet._gate_slots(new_slots, log_gate)
        target = data.edge_index[1]
        per_entry = torch.cat([log_gate[target[group.edges]].repeat_interleave(group.k)
                               for group in edge_groups(data, edge_attr)])
        new_edge_attr = new_edge_attr * per_entry.exp()
    new_x = torch.cat([new_slots, data.x[:, NUM_SLOTS:]], dim=-1)
    keep = metanet._keep_ratios(getattr(data, "batch", None), x, h, node_layer, num_layers,
                                speedup)
    return new_x, new_edge_attr, keep
