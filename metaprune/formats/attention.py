"""Recognise exported ``nn.MultiheadAttention`` regions and restore real modules.

``torch.export`` flattens ``nn.MultiheadAttention`` into ``linear → unflatten(-1, [3, E]) →
view(..., [B, heads, L, hd]) → scaled_dot_product_attention → … → linear``, with the head
count and sizes baked in. Pruners know how to prune a real ``nn.MultiheadAttention`` (whole
embedding channels across q, k, v and heads); they cannot see through the baked region. Each
exported node remembers the module it came from (``meta["nn_module_stack"]``), so the region of
every ``MultiheadAttention`` instance is known: :func:`lift_attention` rebuilds the module from
the region's projections (``<path>.in_proj`` / ``<path>.out_proj`` lifted as ``nn.Linear``),
runs both on the example inputs and swaps the region for the module only when the outputs agree
— a region it cannot reproduce (masks, attention weights used, separate q/k/v projections)
stays functional, and :func:`metaprune.formats.refresh_shapes` guards it after pruning.

Example::

    module, example_inputs = load_model("vit.pt2")    # load_model calls lift_attention
    [n for n, m in module.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
"""

from __future__ import annotations

import itertools
import operator

import torch
import torch.fx
from torch import nn

aten = torch.ops.aten


def _module_type_name(entry) -> str:
    kind = entry[1] if isinstance(entry, tuple) else entry
    return kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"


def _regions(graph: torch.fx.Graph) -> dict[str, list[torch.fx.Node]]:
    regions: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        for entry in (node.meta.get("nn_module_stack") or {}).values():
            if _module_type_name(entry).endswith("MultiheadAttention"):
                regions.setdefault(entry[0], []).append(node)
                break
    return regions


def _values(module: torch.fx.GraphModule, example_inputs: tuple) -> dict[torch.fx.Node, object]:
    interpreter = torch.fx.Interpreter(module, garbage_collect_values=False)
    with torch.no_grad():
        interpreter.run(*example_inputs)
    return interpreter.env


def _projection(module, path, name):
    """(weight, bias) of a projection, lifted as ``<path>.<name>`` or left as raw parameters."""
    try:
        owner = module.get_submodule(path)
    except AttributeError:
        return None, None
    lifted = getattr(owner, name, None)
    if isinstance(lifted, nn.Linear):
        return lifted.weight, lifted.bias
    weight = getattr(owner, f"{name}_weight", None) if name == "in_proj" else None
    bias = getattr(owner, f"{name}_bias", None) if name == "in_proj" else None
    if not isinstance(weight, nn.Parameter) or not (bias is None or isinstance(bias, nn.Parameter)):
        return None, None
    return weight, bias


def _candidate(module, path, region, env):
    """The MultiheadAttention equal to ``region`` and its (q, k, v) input nodes, or None."""
    members = set(region)
    # symbolic sizes (batch * heads) are shared between regions; only tensors count as outputs
    outside_users = {n for n in region if isinstance(env.get(n), torch.Tensor)
                     and any(u not in members for u in n.users)}
    if len(outside_users) != 1:
        return None
    output = outside_users.pop()
    inputs = []
    for node in region:
        for arg in node.all_input_nodes:
            if arg not in members and arg.op != "get_attr" and isinstance(env.get(arg), torch.Tensor) \
                    and arg not in inputs:
                inputs.append(arg)
    if not 1 <= len(inputs) <= 3:
        return None
    in_weight, in_bias = _projection(module, path, "in_proj")
    out_weight, out_bias = _projection(module, path, "out_proj")
    if in_weight is None or out_weight is None or in_weight.dim() != 2 or out_weight.dim() != 2:
        return None
    embed = out_weight.shape[0]
    if tuple(in_weight.shape) != (3 * embed, embed) or tuple(out_weight.shape) != (embed, embed):
        return None
    attention = [n for n in region if n.target == aten.scaled_dot_product_attention.default]
    if len(attention) == 1:
        head_counts = [embed // max(env[attention[0].args[0]].shape[-1], 1)]
    else:  # decomposed attention: let the numerical check below find the head count
        head_counts = [h for h in range(1, embed + 1) if embed % h == 0]
    orderings = {tuple(inputs[i] for i in order) for order in itertools.product(range(len(inputs)), repeat=3)
                 if set(order) == set(range(len(inputs)))}
    expected = env[output]
    for heads, batch_first in itertools.product(head_counts, (True, False)):
        if (in_bias is None) != (out_bias is None):
            return None
        mha = nn.MultiheadAttention(embed, heads, bias=in_bias is not None, batch_first=batch_first)
        mha.in_proj_weight = in_weight
        mha.in_proj_bias = in_bias
        mha.out_proj.weight = out_weight
        mha.out_proj.bias = out_bias
        mha.eval()
        for q, k, v in orderings:
            try:
                with torch.no_grad():
                    got = mha(env[q], env[k], env[v], need_weights=False)[0]
            except (RuntimeError, AssertionError):
                continue
            if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
                return mha, (q, k, v), output
    return None


def lift_attention(module: torch.fx.GraphModule, example_inputs: tuple) -> list[str]:
    """Replace recognisable exported attention regions by ``nn.MultiheadAttention`` modules.

    Args:
        module: a lifted GraphModule (``<path>.in_proj`` / ``<path>.out_proj`` already
            ``nn.Linear``), changed in place.
        example_inputs: inputs used to prove each replacement gives equal outputs.

    Returns:
        The module paths now holding an ``nn.MultiheadAttention``.
    """
    regions = _regions(module.graph)
    if not regions:
        return []
    env = _values(module, example_inputs)
    restored = []
    for path, region in regions.items():
        found = _candidate(module, path, region, env)
        if found is None:
            continue
        mha, (q, k, v), output = found
        graph = module.graph
        with graph.inserting_before(output):
            call = graph.call_module(path, (q, k, v), {"need_weights": False})
            first = graph.call_function(operator.getitem, (call, 0))
        first.meta = dict(output.meta)
        output.replace_all_uses_with(first)
        for node in reversed(region):
            if not node.users:
                graph.erase_node(node)
        *parents, leaf = path.split(".")
        owner = module.get_submodule(".".join(parents)) if parents else module
        delattr(owner, leaf)
        owner.add_module(leaf, mha)
        restored.append(path)
    if restored:
        module.graph.eliminate_dead_code()
        module.graph.lint()
        module.recompile()
    return restored
