"""Baked shape constants in lifted graphs, and how to keep them right after pruning.

``torch.export`` writes concrete sizes into shape operators: ``nn.MultiheadAttention`` becomes
``unflatten(-1, [3, 32])`` and ``view(q, [8, B*4, 8])``, a flatten before a classifier may
become ``view(x, [B, 512])``. Once a pruner removes channels those numbers are wrong.

Two passes handle this, both driven by real example inputs:

* :func:`record_shapes` (run once after lifting, :func:`metaprune.formats.load_model` does it)
  rewrites flatten-like views (output = input's leading dims + the product of the rest) into
  ``aten.flatten.using_ints``, which no longer depends on channel counts, and remembers the
  input/output shape of every remaining *baked-shape node* (``node.meta["metaprune_shape"]``).
  The names of those nodes are listed in ``module.baked_shape_nodes``; the modules whose
  output channels feed an ambiguous baked split (heads × head size, groups × channels) are
  listed in ``module.shape_locked_layers`` (see :func:`shape_locked_layers`) — a pruner should
  pass them as ignored layers.
* :func:`refresh_shapes` (the pruning engine calls it after physically pruning a lifted module)
  propagates the example inputs through the pruned graph and rewrites each baked constant from
  the new input shape: a view/reshape/unflatten is split into groups of input and output dims
  with equal products, and a group whose input product changed gets its one free output
  constant rescaled (a ``-1`` or a symbolic size absorbs the change by itself); ``expand``,
  ``split``/``split_with_sizes`` and full-range ``slice`` follow their input. When a constant is
  ambiguous (two output constants could absorb the change) or the op indexes into a pruned dim,
  it raises :class:`~metaprune.errors.UnsupportedModelError` naming the node — a refusal, the
  module stays as the pruner left it.

Example::

    module, example_inputs = metaprune.load_model("vit.pt2")     # shapes recorded
    ...physically prune channels of module...
    refresh_shapes(module, example_inputs)                        # fix or refuse
    module(*example_inputs)
"""

from __future__ import annotations

import math

import torch
import torch.fx

from metaprune.errors import UnsupportedModelError

aten = torch.ops.aten

_META_KEY = "metaprune_shape"
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_BAKED = _VIEWS | {
    aten.unflatten.int, aten.expand.default, aten.split_with_sizes.default, aten.split.Tensor,
    aten.slice.Tensor, aten.narrow.default, aten.select.int,
}
_INT_MAX = 2**63 - 1


def _shape(value) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


class _ShapeRun(torch.fx.Interpreter):
    """Runs the graph, rewriting (``fix=True``) or recording the baked-shape nodes."""

    def __init__(self, module: torch.fx.GraphModule, fix: bool):
        super().__init__(module)
        self.extra_traceback = False  # our messages already name the node
        self.fix = fix
        self.changed = False

    def run_node(self, node):
        if node.op == "call_function" and node.target in _BAKED:
            source = self.env[node.args[0]] if isinstance(node.args[0], torch.fx.Node) else None
            in_shape = _shape(source)
            recorded = node.meta.get(_META_KEY)
            if self.fix and recorded is not None and in_shape != recorded["in"]:
                new_args = _recompute(node, recorded["in"], recorded["out"], in_shape, self.env)
                if new_args != node.args:
                    node.args = new_args
                    self.changed = True
            try:
                result = super().run_node(node)
            except Exception as err:  # the pruned graph no longer fits this op's constants
                raise UnsupportedModelError(
                    f"after pruning, node {node.name!r} ({node.target}) cannot run on input shape "
                    f"{list(in_shape or ())}: {err}") from err
            out = result[0] if isinstance(result, (tuple, list)) else result
            node.meta[_META_KEY] = {"in": in_shape, "out": _shape(out)}
            return result
        try:
            return super().run_node(node)
        except UnsupportedModelError:
            raise
        except Exception as err:  # a shape mismatch surfacing in a later op
            raise UnsupportedModelError(
                f"after pruning, node {node.name!r} ({node.target}) fails: {err}") from err


def _group_dims(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Split a reshape into (source dims, destination dims) groups with equal products."""
    if 0 in src or 0 in dst or not src or not dst:
        return [(list(range(len(src))), list(range(len(dst))))]
    groups, i, j = [], 0, 0
    while i < len(src) and j < len(dst):
        in_dims, out_dims = [i], [j]
        in_prod, out_prod = src[i], dst[j]
        i, j = i + 1, j + 1
        while in_prod != out_prod:
            if in_prod < out_prod:
                in_dims.append(i); in_prod *= src[i]; i += 1
            else:
                out_dims.append(j); out_prod *= dst[j]; j += 1
        groups.append((in_dims, out_dims))
    groups[-1][0].extend(range(i, len(src)))  # trailing size-1 dims
    groups[-1][1].extend(range(j, len(dst)))
    return groups


def _rescale_sizes(node, sizes, old_in, old_out, new_in, env, groups=None):
    """New size list for a view-like op; ``sizes`` may hold ints, -1 and symbolic nodes.

    Symbolic sizes (computed from the batch at run time) are fixed; a ``-1`` absorbs any
    change of its group; otherwise exactly one integer constant of the group must be able to.
    """
    sizes = list(sizes)
    current = [env[s] if isinstance(s, torch.fx.Node) else s for s in sizes]
    for in_dims, out_dims in groups if groups is not None else _group_dims(old_in, old_out):
        new_prod = math.prod(new_in[d] for d in in_dims)
        if any(current[j] == -1 for j in out_dims):
            continue
        if math.prod(current[j] for j in out_dims) == new_prod:
            continue
        constants = [j for j in out_dims if not isinstance(sizes[j], torch.fx.Node)]
        candidates = []
        for j in constants:
            others = math.prod(current[k] for k in out_dims if k != j)
            if others and new_prod % others == 0:
                candidates.append((j, new_prod // others))
        if len(candidates) != 1:
            raise UnsupportedModelError(
                f"pruning changed the size of dims {in_dims} feeding node {node.name!r} "
                f"({node.target}) to {new_prod} elements, and its baked shape "
                f"{[current[j] for j in out_dims]} cannot be recomputed unambiguously; "
                "exclude the layers before it from pruning")
        j, value = candidates[0]
        sizes[j] = current[j] = value
    return sizes


def _recompute(node, old_in, old_out, new_in, env) -> tuple:
    """New args for one baked-shape node whose input shape changed."""
    target, args = node.target, list(node.args)
    if len(old_in) != len(new_in):
        raise UnsupportedModelError(f"node {node.name!r}: input rank changed after pruning")
    changed = [d for d in range(len(old_in)) if old_in[d] != new_in[d]]
    if target in _VIEWS:
        args[1] = _rescale_sizes(node, args[1], old_in, old_out, new_in, env)
    elif target == aten.unflatten.int:
        dim = args[1] % len(old_in)
        args[2] = _rescale_sizes(node, args[2], (old_in[dim],), tuple(old_out[dim:dim + len(args[2])]),
                                 (new_in[dim],), env, [([0], list(range(len(args[2]))))])
    elif target == aten.expand.default:
        sizes = list(args[1])
        offset = len(sizes) - len(old_in)
        for d in changed:
            j = d + offset
            if isinstance(sizes[j], int) and sizes[j] not in (-1, new_in[d]):
                if sizes[j] != old_in[d]:
                    raise UnsupportedModelError(f"node {node.name!r}: expand over a pruned dim")
                sizes[j] = new_in[d]
        args[1] = sizes
    elif target in (aten.split_with_sizes.default, aten.split.Tensor):
        dim = (args[2] if len(args) > 2 else node.kwargs.get("dim", 0)) % len(old_in)
        if dim in changed:
            old, new = old_in[dim], new_in[dim]
            if target == aten.split.Tensor:
                chunks = math.ceil(old / args[1])
                if old % args[1] or new % chunks:
                    raise UnsupportedModelError(f"node {node.name!r}: uneven split over a pruned dim")
                args[1] = new // chunks
            else:
                parts = list(args[1])
                if len(set(parts)) != 1 or new % len(parts):
                    raise UnsupportedModelError(
                        f"node {node.name!r}: split sizes {parts} over a pruned dim cannot be recomputed")
                args[1] = [new // len(parts)] * len(parts)
    elif target == aten.slice.Tensor:
        dim = (args[1] if len(args) > 1 else 0) % len(old_in)
        if dim in changed:
            start = args[2] if len(args) > 2 else None
            end = args[3] if len(args) > 3 else None
            step = args[4] if len(args) > 4 else 1
            if start not in (None, 0) or step != 1 or not (end is None or end >= old_in[dim]):
                raise UnsupportedModelError(f"node {node.name!r}: slice inside a pruned dim")
            if end is not None and end < _INT_MAX:
                args[3] = new_in[dim]
    elif target in (aten.narrow.default, aten.select.int):
        dim = args[1] % len(old_in)
        if dim in changed:
            raise UnsupportedModelError(f"node {node.name!r} ({target}) indexes into a pruned dim")
    return tuple(args)


def _rewrite_flatten_views(module: torch.fx.GraphModule) -> int:
    """Replace views whose output is ``input[:k] + [prod(input[k:])]`` by ``flatten(x, k)``."""
    rewritten = 0
    for node in list(module.graph.nodes):
        if node.op != "call_function" or node.target not in _VIEWS:
            continue
        recorded = node.meta.get(_META_KEY)
        if not recorded or recorded["in"] is None:
            continue
        src, dst = recorded["in"], recorded["out"]
        k = len(dst) - 1
        if 1 <= k < len(src) and dst[:k] == src[:k] and dst[k] == math.prod(src[k:]):
            with module.graph.inserting_before(node):
                flat = module.graph.call_function(aten.flatten.using_ints, (node.args[0], k, -1))
            flat.meta = dict(node.meta)
            node.replace_all_uses_with(flat)
            module.graph.erase_node(node)
            rewritten += 1
    return rewritten


def _baked_nodes(module: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in module.graph.nodes if n.op == "call_function" and n.target in _BAKED]


def _locks_channels(node: torch.fx.Node) -> bool:
    """True when a pruned input dim of this view could be absorbed by two or more constants."""
    recorded = node.meta.get(_META_KEY)
    if not recorded or recorded["in"] is None or recorded["out"] is None:
        return False
    if node.target in _VIEWS:
        sizes, groups = list(node.args[1]), _group_dims(recorded["in"], recorded["out"])
    elif node.target == aten.unflatten.int:
        sizes = list(node.args[2])
        groups = [([0], list(range(len(sizes))))]
    else:
        return False
    for _, out_dims in groups:
        if any(isinstance(sizes[j], int) and sizes[j] == -1 for j in out_dims):
            continue
        constants = [j for j in out_dims if isinstance(sizes[j], int) and sizes[j] > 1]
        if len(constants) >= 2:
            return True
    return False


def _producers(start: torch.fx.Node) -> set[str]:
    """The modules whose outputs reach ``start`` through functional ops."""
    found, stack, seen = set(), [start], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            found.add(node.target)
        elif node.op == "call_function":
            stack.extend(n for n in node.all_input_nodes if n.op not in ("get_attr", "placeholder"))
    return found


def shape_locked_layers(module: torch.fx.GraphModule) -> list[str]:
    """Names of modules whose output channels feed a baked split of a dim into several constants.

    Pruning such a module's outputs leaves :func:`refresh_shapes` an ambiguous choice (e.g.
    ``reshape(qkv, [B, n, 3, heads, head_dim])``: fewer heads or smaller heads?), so it would
    refuse. A pruner that passes these modules as ignored layers prunes the rest of the model.
    Needs :func:`record_shapes` to have run; also stored as ``module.shape_locked_layers``.

    Example::

        model, example_inputs = load_model("fused_qkv.pt2")
        ignored = [model.get_submodule(name) for name in shape_locked_layers(model)]
        # tp.pruner.MagnitudePruner(model, example_inputs, ignored_layers=ignored, ...)
    """
    locked: set[str] = set()
    for node in module.graph.nodes:
        if node.op == "call_function" and _locks_channels(node) and isinstance(node.args[0], torch.fx.Node):
            locked |= _producers(node.args[0])
    return sorted(locked)


def record_shapes(module: torch.fx.GraphModule, example_inputs: tuple) -> list[str]:
    """Make flatten-like views shape-agnostic and remember every remaining baked shape.

    Args:
        module: a GraphModule (e.g. from :func:`metaprune.formats.lift.lift_program`).
        example_inputs: a tuple of tensors the module runs on.

    Returns:
        The names of the baked-shape nodes, also stored as ``module.baked_shape_nodes``.
    """
    with torch.no_grad():
        _ShapeRun(module, fix=False).run(*example_inputs)
    if _rewrite_flatten_views(module):
        module.graph.lint()
        module.recompile()
    module.baked_shape_nodes = _baked_nodes(module)
    module.shape_locked_layers = shape_locked_layers(module)
    return module.baked_shape_nodes


def refresh_shapes(module: torch.fx.GraphModule, example_inputs: tuple) -> bool:
    """Recompute baked shape constants after channels were pruned; refuse when ambiguous.

    Args:
        module: a lifted GraphModule whose shapes were recorded by :func:`record_shapes`
            (nodes without a record are recorded now and taken as correct).
        example_inputs: a tuple of tensors the module runs on.

    Returns:
        True when some constant was rewritten.

    Raises:
        UnsupportedModelError: a constant cannot be recomputed, or the pruned graph no longer
            runs; the message names the node.
    """
    if not isinstance(module, torch.fx.GraphModule):
        return False
    was_training = module.training
    module.eval()  # shape propagation must not update BatchNorm running statistics
    run = _ShapeRun(module, fix=True)
    try:
        with torch.no_grad():
            run.run(*example_inputs)
    finally:
        module.train(was_training)
    if run.changed:
        module.recompile()
    module.baked_shape_nodes = _baked_nodes(module)
    module.shape_locked_layers = shape_locked_layers(module)
    return run.changed


__all__ = ["record_shapes", "refresh_shapes", "shape_locked_layers"]
