"""`to_graph`: trace a module once and build its `NetworkGraph`."""

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from metaprune.errors import UnsupportedModelError
from metaprune.graph.builder import GraphBuilder
from metaprune.graph.network_graph import NetworkGraph, assemble
from metaprune.graph.planes import along, planes_of, set_planes
from metaprune.graph.rules import rule_for
from metaprune.graph.trace import ChannelTracer


def to_graph(module: nn.Module, example_inputs: Sequence) -> NetworkGraph:
    """Convert `module` into a graph of channels (nodes) and weights (edges).

    Args:
        module: any network made of Conv/ConvTranspose (1-3 d, any groups), Linear, Embedding,
            nn.MultiheadAttention and BatchNorm/LayerNorm/GroupNorm/InstanceNorm layers, glued by
            arbitrary parameter-free torch code (residual adds, concatenation, gating, reshapes,
            hand-written attention), plus free parameters that are added or concatenated
            (class tokens, positional embeddings). It is not modified.
        example_inputs: a tuple of inputs for one forward pass (a tensor is accepted too).
            Float inputs provide the model's input channels: axis 1 (``[N, C, ...]``), or for a
            3-d input whichever of axis 1 and the last axis the model reads (``[N, T, D]``
            sequences); integer inputs are token ids for an Embedding.

    Raises:
        UnsupportedModelError: naming the operator and the module where it sits, for a
            parametrised module or a use of a parameter the graph cannot represent.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...                       nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
        >>> graph = to_graph(model, (torch.randn(1, 3, 32, 32),))
        >>> graph.num_nodes, graph.num_edges          # 3 + 8 + 10 channels
        (21, 104)
        >>> graph.data.edge_group_k.tolist()          # Linear edges carry 900 weights each
        [9, 900]
        >>> copy = graph.write_back()                 # bit-identical new module
    """
    if not isinstance(module, nn.Module):
        raise UnsupportedModelError(f"expected an nn.Module, got {type(module).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)

    layer_modules = _layer_modules(module)
    dtype = _parameter_dtype(module)
    _check_shared_parameters(module, layer_modules)

    builder = GraphBuilder()
    inputs, alternatives = [], []
    for index, value in enumerate(example_inputs):
        if isinstance(value, torch.Tensor):
            value = value.detach().clone()
            if value.is_floating_point() and value.dim() >= 1:
                alternatives.append(_label_input(builder, value, index))
        inputs.append(value)

    tracer = ChannelTracer(module, builder, layer_modules)
    called: set[str] = set()
    hooks = _install_hooks(module, layer_modules, tracer, called)
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()  # no running-statistics updates while tracing
        with torch.no_grad(), tracer:
            output = module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes.items():
            m.training = training

    output_nodes = _output_nodes(output)
    output_nodes = _drop_unused_inputs(builder, alternatives, output_nodes)
    side, notes = _side_store(module, layer_modules, called, tracer)
    graph = assemble(builder, module, dtype, output_nodes, side, notes)
    # what a pruner needs beyond the features: every edge block (tied ones included), and the
    # coupling / pinned channels recorded while tracing
    graph.blocks, graph.slots = builder.blocks, builder.slots
    graph.couplings, graph.pinned = builder.couplings, builder.pinned
    graph.head_splits = builder.head_splits
    graph.functional_norms = tracer.functional_norms
    return graph


def _side_store(module, layer_modules, called, tracer) -> tuple[dict, list[str]]:
    """Parameters that are no graph feature (free ones added/concatenated, unused ones), with
    notes on those the forward pass never touched."""
    layer_param_names = {
        f"{name}.{pname}" if name else pname: name
        for name, layer in layer_modules.items()
        for pname, _ in layer.named_parameters()
    }
    side, notes = {}, []
    for name, param in module.named_parameters():
        owner = layer_param_names.get(name)
        if (owner is not None and owner in called) or name in tracer.scale_params:
            continue
        if owner is not None:
            notes.append(f"layer '{owner}' is never called; '{name}' kept in the side store")
        elif name not in tracer.used_free_params:
            notes.append(f"parameter '{name}' is never used; kept in the side store")
        side[name] = param.detach().clone()
    return side, notes


def _label_input(builder: GraphBuilder, value: torch.Tensor, index: int) -> list[int]:
    """Input channel nodes along axis 1 (``[N, C, ...]``) and, for 3-d inputs, along the last
    axis too: ``[N, C, L]`` signals and ``[N, T, D]`` sequences look alike, and which axis the
    model reads is only known after tracing. Returns the candidate input layers."""
    axes = [1 if value.dim() >= 2 else 0]
    if value.dim() == 3:
        axes.append(2)
    planes, layers = [], []
    for axis in axes:
        name = f"input.{index}" if axis == axes[0] else f"input.{index}.last_axis"
        layer = builder.add_layer(name, "input", "input", value.shape[axis])
        planes.append(along(value.dim(), axis, builder.nodes_of(layer)))
        layers.append(layer)
    set_planes(value, planes)
    return layers


def _drop_unused_inputs(builder: GraphBuilder, alternatives: list[list[int]], output_nodes):
    """Remove the input labelling no layer read (keep axis 1 when neither was read)."""
    used = set()
    for block in builder.blocks:
        used.update(block.sources.tolist())
    for slot in builder.slots:
        used.update(slot.nodes.tolist())
    drop = set()
    for layers in alternatives:
        unused = [
            layer for layer in layers
            if not used.intersection(builder.nodes_of(layer).tolist())
        ]
        if len(unused) == len(layers):
            unused = unused[1:]
        drop.update(unused)
    if not drop:
        return output_nodes
    return builder.drop_layers(drop, output_nodes)


def _layer_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Supported layers, outermost first (an attention block's own Linear is not separate)."""
    found = {}
    for name, sub in module.named_modules():
        if any(name.startswith(f"{outer}.") or outer == "" for outer in found):
            continue
        if rule_for(sub) is not None:
            found[name] = sub
    return found


def _parameter_dtype(module: nn.Module) -> torch.dtype:
    dtypes = {p.dtype for p in module.parameters()}
    dtypes |= {b.dtype for b in module.buffers() if b.is_floating_point()}
    if len(dtypes) > 1:
        raise UnsupportedModelError(
            f"parameters have several dtypes ({sorted(map(str, dtypes))}); the graph keeps one"
        )
    return dtypes.pop() if dtypes else torch.float32


def _check_shared_parameters(module: nn.Module, layer_modules: dict[str, nn.Module]):
    """Refuse parameters shared between layers, except tied weight matrices.

    A weight shared by two Linear/Embedding/Conv layers (an LM head tied to the token
    embedding) is stored once: the first layer that runs carries its values as edge features,
    the other gets featureless edges and a ``tied`` annotation (`LayerInfo.tied`), so
    `write_back` writes it once and the tie survives (the copy shares one tensor).
    """
    seen: dict[int, str] = {}
    for name, layer in layer_modules.items():
        for pname, param in layer.named_parameters(remove_duplicate=False):
            where = f"{name}.{pname}" if name else pname
            tieable = pname == "weight" and isinstance(
                layer, (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd))
            if id(param) in seen and seen[id(param)] != where and not tieable:
                raise UnsupportedModelError(
                    f"parameter '{where}' is shared with '{seen[id(param)]}'; the graph cannot "
                    "represent one weight in two layers"
                )
            seen[id(param)] = where
            if not param.is_contiguous():
                raise UnsupportedModelError(f"parameter '{where}' is not contiguous")


def _install_hooks(module, layer_modules, tracer: ChannelTracer, called: set) -> list:
    hooks = []
    for name, sub in module.named_modules():
        hooks.append(sub.register_forward_pre_hook(_push_location(tracer, name)))
        hooks.append(sub.register_forward_hook(_pop_location(tracer), always_call=True))
    for name, layer in layer_modules.items():
        hooks.append(layer.register_forward_pre_hook(
            _enter_layer(tracer, name, called), with_kwargs=True))
        hooks.append(layer.register_forward_hook(
            _leave_layer(tracer, name, rule_for(layer)), with_kwargs=True))
    return hooks


def _push_location(tracer, name):
    def hook(module, args):
        tracer.location.append(name)
    return hook


def _pop_location(tracer):
    def hook(module, args, output):
        if tracer.location:
            tracer.location.pop()
    return hook


def _enter_layer(tracer, name, called):
    def hook(module, args, kwargs):
        if name in called:
            raise UnsupportedModelError(
                f"layer '{name}' ({type(module).__name__}) is called more than once; the graph "
                "cannot represent one weight applied at two places"
            )
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            raise UnsupportedModelError(
                f"nn.Embedding '{name}' uses max_norm, which rewrites its weights in forward"
            )
        called.add(name)
        tracer.layer_depth += 1
    return hook


def _leave_layer(tracer, name, rule):
    def hook(module, args, kwargs, output):
        try:
            planes = rule(tracer.builder, name, module, args, kwargs, output)
        finally:
            tracer.layer_depth -= 1
        target = output[0] if isinstance(output, tuple) else output
        set_planes(target, planes)
    return hook


def _output_nodes(output) -> torch.Tensor:
    nodes = [
        plane.reshape(-1)
        for leaf in tree_flatten(output)[0] if isinstance(leaf, torch.Tensor)
        for plane in planes_of(leaf)
    ]
    if not nodes:
        return torch.zeros(0, dtype=torch.long)
    nodes = torch.unique(torch.cat(nodes))
    return nodes[nodes >= 0]
