"""The metanetwork's forward pass on an edge list: PyG message passing with scatters.

This is the formulation the committed checkpoint was trained with, kept verbatim as the test
oracle of `MetaNetwork.forward` (which walks edge grids chunk by chunk instead): on small models
both agree to float rounding, outputs and gradients. The "linear" message kind's oracle is here
too: its messages ``sum_c E_ijc (A_c h_j + b_c)`` per edge, scattered to their targets. It holds ``[num_edges, hidden]`` tensors
for the whole model, so use it on small graphs only.

Example::

    graph = to_graph(model, example_inputs)
    new_x, new_edge_attr, keep = scatter_forward(metanet, graph.data, speedup=2.0)
    torch.testing.assert_close(new_edge_attr, metanet(graph, speedup=2.0)[1])
"""

import torch
from torch_geometric.utils import scatter

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
    if metanet.message == "linear":
        h = _linear_rounds(metanet, data, edge_attr, edge_scale, h)
        edge_delta = _low_rank_deltas(metanet, data, edge_attr, edge_scale, h)
    else:
        e = metanet.edge_encoder(data, edge_attr, edge_scale)
        for block in metanet.blocks:
            h, e = block(h, data.edge_index, e)
        edge_delta = metanet.edge_decoder(data, edge_attr, edge_scale, e)
    edge_delta = metanet.delta_scale() * edge_delta

    new_slots = metanet._rewrite_slots(data.x, h, data.x_param_mask, slot_scale, node_layer)
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


def _edge_channels(data, edge_attr, edge_scale) -> torch.Tensor:
    """[num_edges, EDGE_CHANNELS]: 1, mean and RMS of every edge's normalised weights."""
    parts = []
    for group in edge_groups(data, edge_attr):
        count = group.attr.shape[0]
        if group.k == 0:
            parts.append(torch.cat([group.attr.new_ones(count, 1),
                                    group.attr.new_zeros(count, 2)], dim=1))
            continue
        values = group.attr / edge_scale[group.edges].unsqueeze(1)
        parts.append(torch.stack([torch.ones_like(values[:, 0]), values.mean(1),
                                  values.square().mean(1).sqrt()], dim=1))
    return torch.cat(parts)


def _linear_rounds(metanet, data, edge_attr, edge_scale, h):
    """The "linear" kind's rounds on the edge list: per-edge messages, scatter sums."""
    channels = _edge_channels(data, edge_attr, edge_scale).unsqueeze(-1)  # [edges, C, 1]
    source, target = data.edge_index
    num_nodes = h.shape[0]
    ones = h.new_ones(source.numel())
    incoming = scatter(ones, target, 0, num_nodes, "sum")
    outgoing = scatter(ones, source, 0, num_nodes, "sum")
    for block in metanet.blocks:
        forward_table, reverse_table = block.tables(h)
        forward = scatter((channels * forward_table[source]).sum(1), target, 0, num_nodes, "sum")
        reverse = scatter((channels * reverse_table[target]).sum(1), source, 0, num_nodes, "sum")
        h = block.update_nodes(h, forward, reverse, incoming, outgoing)
    return h


def _low_rank_deltas(metanet, data, edge_attr, edge_scale, h):
    """Flat deltas laid out like `edge_attr`: ``(w <u_i, v_j> + <p_i, q_j>) * rms`` per entry."""
    factors = metanet.edge_decoder.factors(h)
    source, target = data.edge_index
    parts = []
    for group in edge_groups(data, edge_attr):
        if group.k == 0:
            continue
        src, dst = source[group.edges], target[group.edges]
        scale = edge_scale[group.edges].unsqueeze(1)
        gain = (factors.scale_target[dst] * factors.scale_source[src]).sum(-1, keepdim=True)
        shift = (factors.shift_target[dst] * factors.shift_source[src]).sum(-1, keepdim=True)
        parts.append(((group.attr / scale * gain + shift) * scale).reshape(-1))
    return torch.cat(parts) if parts else edge_attr.new_zeros(0)
