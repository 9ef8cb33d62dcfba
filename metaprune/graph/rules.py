"""One rule per parametrised operator kind: weights -> edges, per-channel parameters -> nodes.

Every rule receives the builder, the module's path and the module, its call arguments and its
output, and returns the label planes of the output. Rules never look at the architecture around
the layer: they read the input channels from the planes the tracer attached to the inputs.

- Convolution (1-3 d, any groups): output channel j of group g gets an edge from every input
  channel i of group g carrying ``W[j, i]`` (the whole kernel; k = kernel size).
- Transposed convolution: the same with the weight's ``[in, out / groups, *kernel]`` layout.
- Linear: edge from input node to output neuron carrying ``W[j, i]``. When several input
  features belong to one node (flatten of a ``C x H x W`` map into a Linear), the edge carries
  all of that node's weights in feature order (k = H*W), so no weight is padded or dropped.
- Functional linear ``addmm(b, x, W)`` on a module's own ``W`` stored ``[in, out]`` (GPT-2's
  ``Conv1D``): the Linear rule with the transposed layout (`functional_linear`).
- Embedding: one ``vocabulary`` node per row; edge (token v -> embedding dim e) carries W[v, e].
- MultiheadAttention: q/k/v projections are a Linear from the query/key/value channels to 3E
  ``attention_in`` nodes, the output projection a Linear from the E value nodes.
- BatchNorm / LayerNorm (1-d normalized_shape) / GroupNorm / InstanceNorm: affine parameters and
  running statistics fold into the slots of the channels they normalise; when those channels
  already hold a normalisation, the norm gets nodes of its own, linked by identity edges.
"""

import math

import torch
from torch import nn

from metaprune.errors import UnsupportedModelError
from metaprune.graph.builder import GraphBuilder
from metaprune.graph.planes import along, channel_labels, planes_of, poison_of, signature

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
INSTANCE_NORM_TYPES = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _path(module_path: str, attr: str) -> str:
    """Qualified name of a parameter or sub-part (the root module has the empty path)."""
    return f"{module_path}.{attr}" if module_path else attr


def input_labels(builder: GraphBuilder, tensor, axis: int, who: str) -> torch.Tensor:
    """Node of each input feature along `axis`; unexplained features get fresh nodes."""
    if not isinstance(tensor, torch.Tensor):
        raise UnsupportedModelError(f"layer '{who}' received a {type(tensor).__name__} input")
    reason = poison_of(tensor)
    if reason:
        raise UnsupportedModelError(
            f"layer '{who}' reads channels produced by {reason}"
        )
    axis = axis % tensor.dim()
    labels = channel_labels(tensor, axis)
    if labels is None:
        labels = torch.full((tensor.shape[axis],), -1, dtype=torch.long)
    return builder.fill_unknown(labels, who)


def dense_edges(builder, layer, param, weight, view, labels, out_nodes, *, rows=None):
    """Edges of a weight viewed as [rows, cols, kernel] whose columns have node `labels`.

    Columns sharing a node (flatten->Linear) are gathered into one edge per (row, node), with the
    node's columns in ascending order: k = columns per node x kernel.
    """
    unique, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    if unique.numel() == labels.numel():
        builder.add_weight_edges(layer, param, weight, view, labels[None], out_nodes[:, None],
                                 unique, rows=rows)
        return
    if not bool((counts == counts[0]).all()):
        raise UnsupportedModelError(
            f"{param}: its input features come from channels contributing unequal numbers of "
            f"features ({sorted(set(counts.tolist()))}); the graph needs one edge length per "
            "input channel"
        )
    perm = torch.argsort(inverse, stable=True)
    builder.add_weight_edges(layer, param, weight, view, unique[None], out_nodes[:, None],
                             unique, rows=rows, col_perm=perm)


def _require_distinct(labels: torch.Tensor, who: str):
    if torch.unique(labels).numel() != labels.numel():
        raise UnsupportedModelError(
            f"grouped/transposed convolution '{who}' reads several input channels from one "
            "graph channel; the converter cannot split them per group"
        )


def conv_rule(builder, name, module, args, kwargs, output):
    transposed = isinstance(module, CONV_TRANSPOSE_TYPES)
    labels = input_labels(builder, args[0], 1, name)
    kernel = math.prod(module.kernel_size)
    groups = module.groups
    in_ch, out_ch = module.in_channels, module.out_channels
    layer = builder.add_layer(
        name, "conv_transpose" if transposed else "conv", type(module).__name__, out_ch,
        kernel_numel=kernel, grouped=groups > 1, channelwise=groups == in_ch == out_ch,
    )
    out_nodes = builder.nodes_of(layer)
    in_group, out_group = in_ch // groups, out_ch // groups
    weight = module.weight
    if not transposed and groups == 1:
        dense_edges(builder, layer, _path(name, "weight"), weight, (out_ch, in_ch, kernel),
                    labels, out_nodes)
    elif not transposed:
        _require_distinct(labels, name)
        row = torch.arange(out_ch)[:, None]
        src = labels[(row // out_group) * in_group + torch.arange(in_group)[None, :]]
        if groups != in_ch:  # a grouped (not depthwise) conv is pruned by whole groups
            builder.couple(out_nodes[:, None], src)
            builder.couple(out_nodes.reshape(groups, -1)[:, :1], out_nodes.reshape(groups, -1))
        builder.add_weight_edges(layer, _path(name, "weight"), weight, (out_ch, in_group, kernel),
                                 src, out_nodes[:, None], labels)
    else:
        _require_distinct(labels, name)
        row = torch.arange(in_ch)[:, None]
        dst = out_nodes[(row // in_group) * out_group + torch.arange(out_group)[None, :]]
        builder.add_weight_edges(layer, _path(name, "weight"), weight, (in_ch, out_group, kernel),
                                 labels[:, None], dst, labels)
    if module.bias is not None:
        builder.add_slot(layer, _path(name, "bias"), module.bias, out_nodes, "bias")
    return [along(output.dim(), 1, out_nodes)]


def linear_rule(builder, name, module, args, kwargs, output):
    source = args[0]
    labels = input_labels(builder, source, -1, name)
    layer = builder.add_layer(name, "linear", type(module).__name__, module.out_features)
    out_nodes = builder.nodes_of(layer)
    dense_edges(builder, layer, _path(name, "weight"), module.weight,
                (module.out_features, module.in_features, 1), labels, out_nodes)
    if module.bias is not None:
        builder.add_slot(layer, _path(name, "bias"), module.bias, out_nodes, "bias")
    # planes labelling other axes (tokens, batch) pass through a per-position Linear
    kept = [p for p in planes_of(source) if p.shape[-1] == 1 and signature(p)]
    return kept + [along(output.dim(), -1, out_nodes)]


def functional_linear(builder, where, weight_name, weight, bias_name, bias, source, output,
                      module_type):
    """``addmm(bias, x, W)`` with ``W`` stored ``[in, out]`` (transformers' GPT-2 ``Conv1D``):
    a Linear whose weight rows are its inputs. Edge (input i -> output j) carries ``W[i, j]``;
    the layer is named after the module owning ``W``. Returns the output's planes."""
    labels = input_labels(builder, source, -1, where)
    if torch.unique(labels).numel() != labels.numel():
        raise UnsupportedModelError(
            f"'{where}' (addmm) reads several input features from one graph channel; only "
            "one feature per channel is supported for a weight stored [in, out]")
    in_features, out_features = weight.shape
    layer = builder.add_layer(where, "linear", module_type, out_features)
    out_nodes = builder.nodes_of(layer)
    builder.add_weight_edges(layer, weight_name, weight, (in_features, out_features, 1),
                             labels[:, None], out_nodes[None, :], labels)
    if bias is not None:
        builder.add_slot(layer, bias_name, bias, out_nodes, "bias")
    kept = [p for p in planes_of(source) if p.shape[-1] == 1 and signature(p)]
    return kept + [along(output.dim(), -1, out_nodes)]


def embedding_rule(builder, name, module, args, kwargs, output):
    vocab, dim = module.weight.shape
    vocab_layer = builder.add_layer(_path(name, "vocabulary"), "vocabulary", "vocabulary", vocab)
    layer = builder.add_layer(name, "embedding", type(module).__name__, dim)
    vocab_nodes, out_nodes = builder.nodes_of(vocab_layer), builder.nodes_of(layer)
    builder.add_weight_edges(layer, _path(name, "weight"), module.weight, (vocab, dim, 1),
                             vocab_nodes[:, None], out_nodes[None, :], vocab_nodes)
    kept = [p.unsqueeze(-1) for p in planes_of(args[0])]
    return kept + [along(output.dim(), -1, out_nodes)]


def attention_rule(builder, name, module, args, kwargs, output):
    names = ("query", "key", "value")
    inputs = [args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names)]
    if module.bias_k is not None or module.bias_v is not None:
        raise UnsupportedModelError(
            f"nn.MultiheadAttention '{name}' uses add_bias_kv, which the graph does not represent"
        )
    embed = module.embed_dim
    labels = [input_labels(builder, t, -1, _path(name, n)) for t, n in zip(inputs, names)]
    layer_in = builder.add_layer(_path(name, "in_proj"), "attention_in", type(module).__name__,
                                 3 * embed)
    in_nodes = builder.nodes_of(layer_in)
    for index, lab in enumerate(labels):
        nodes = in_nodes[index * embed:(index + 1) * embed]
        if module._qkv_same_embed_dim:
            dense_edges(builder, layer_in, _path(name, "in_proj_weight"), module.in_proj_weight,
                        (3 * embed, embed, 1), lab, nodes,
                        rows=(index * embed, (index + 1) * embed))
        else:
            pname = f"{names[index][0]}_proj_weight"
            weight = getattr(module, pname)
            dense_edges(builder, layer_in, _path(name, pname), weight,
                        (embed, weight.shape[1], 1), lab, nodes)
    if module.in_proj_bias is not None:
        builder.add_slot(layer_in, _path(name, "in_proj_bias"), module.in_proj_bias, in_nodes,
                         "bias")
    proj = module.out_proj
    layer_out = builder.add_layer(_path(name, "out_proj"), "linear", type(proj).__name__, embed)
    out_nodes = builder.nodes_of(layer_out)
    dense_edges(builder, layer_out, _path(name, "out_proj.weight"), proj.weight, (embed, embed, 1),
                in_nodes[2 * embed:], out_nodes)
    if proj.bias is not None:
        builder.add_slot(layer_out, _path(name, "out_proj.bias"), proj.bias, out_nodes, "bias")
    attn_output = output[0]
    return [along(attn_output.dim(), -1, out_nodes)]


def norm_rule(builder, name, module, args, kwargs, output):
    source = args[0]
    if isinstance(module, nn.LayerNorm):
        kind, axis = "layer", source.dim() - 1
        if len(module.normalized_shape) != 1 and module.elementwise_affine:
            raise UnsupportedModelError(
                f"nn.LayerNorm '{name}' normalises {len(module.normalized_shape)} axes with an "
                "affine per element; the graph folds one parameter per channel"
            )
    else:
        kind = "batch" if isinstance(module, BATCH_NORM_TYPES) else (
            "group" if isinstance(module, nn.GroupNorm) else "instance")
        axis = 1
    entries = [
        (slot, _path(name, attr), getattr(module, attr, None))
        for slot, attr in (("norm_weight", "weight"), ("norm_bias", "bias"),
                           ("norm_running_mean", "running_mean"),
                           ("norm_running_var", "running_var"))
    ]
    groups = module.num_groups if isinstance(module, nn.GroupNorm) else 1
    return fold_norm(builder, name, type(module).__name__, kind, source, axis, entries, groups)


def fold_norm(builder, name, module_type, kind, source, axis, entries, groups=1):
    """Fold a normalisation's per-channel tensors into the slots of the channels along `axis`.

    Shared by the module rule above and the tracer's functional norms (``F.layer_norm`` on a
    module's own parameters, as ConvNeXt's ``LayerNorm2d`` calls it). `entries` are
    ``(slot, parameter name, tensor or None)``; `groups` > 1 (GroupNorm) couples the channels of
    each normalisation group, so a pruner removes whole groups.
    """
    entries = [(slot, pname, value) for slot, pname, value in entries if value is not None]
    planes = list(planes_of(source))
    if not entries:
        return planes  # nothing to store: the channels pass unchanged
    labels = input_labels(builder, source, axis, name)
    if groups > 1:
        per_group = labels.reshape(groups, -1)
        builder.couple(per_group[:, :1], per_group)
    foldable = (
        torch.unique(labels).numel() == labels.numel() and builder.norm_slots_free(labels)
    )
    if foldable:
        nodes = labels
        layer = builder.layer_of_node(int(labels[0]))
        builder.layers[layer].norms.append(name)
    else:
        layer = builder.add_layer(name, "norm", module_type, labels.numel())
        nodes = builder.nodes_of(layer)
        builder.add_identity_edges(layer, labels, nodes)
        planes = [p for p in planes if p.shape[axis] == 1] + [along(source.dim(), axis, nodes)]
    builder.take_norm_slots(nodes, kind)
    for slot, pname, value in entries:
        builder.add_slot(layer, pname, value.reshape(-1) if value.dim() > 1 else value, nodes,
                         slot)
    return planes


LAYER_RULES = (
    (CONV_TYPES + CONV_TRANSPOSE_TYPES, conv_rule),
    ((nn.Linear,), linear_rule),
    ((nn.Embedding,), embedding_rule),
    ((nn.MultiheadAttention,), attention_rule),
    (BATCH_NORM_TYPES + INSTANCE_NORM_TYPES + (nn.LayerNorm, nn.GroupNorm), norm_rule),
)


def rule_for(module: nn.Module):
    """The rule of a supported layer, or None.

    A subclass counts only while it keeps its base class's forward: one that rewrites the
    computation (weight standardisation, a custom kernel) is treated as an unknown module.
    """
    for types, rule in LAYER_RULES:
        for base in types:
            if isinstance(module, base) and type(module).forward is base.forward:
                return rule
    return None
