"""Channel groups read from the channel graph, for models torch-pruning's tracer cannot follow.

Torch-Pruning's `DependencyGraph` treats ``matmul``, ``permute`` and ``repeat_interleave`` as
elementwise, so hand-written attention (LLaMA, BERT, GPT-2), grouped-query attention, grouped
convolutions and weights tied between two layers come out wrongly coupled (or its group search
never ends). The channel graph of `metaprune.graph` follows every entry of every operator
exactly, so the coupling is read from it instead, with one rule per operator kind:

- identity edges (residual adds, gating products, norm copies, layer scale) and channel-wise
  layers (depthwise convolutions): the two channels are one unit;
- a reshape that splits a channel axis into (heads, head_dim): all channels of a head are one
  unit, so heads are removed whole (rotary pairs stay intact);
- a matrix product: channel k of both operands along the contracted axis (a query's and a key's
  head dimension) and everything at one index of a batch axis (a head of queries, keys and
  values; with ``repeat_interleave`` a key-value head and all its query heads) are one unit;
- a grouped convolution / multi-group GroupNorm: a whole group is one unit;
- channels of the model input, a vocabulary, token positions, the model output, or channels an
  operator contracts with a constant are never removed.

Units that touch the same parameters the same number of times form one `ChannelGroup` (e.g. the
32 channels of a LLaMA's hidden size, or its 2 key-value head groups), so the allocation, the
cost model and the target search of `metaprune.pruning.engine` work unchanged. Removal slices
every parameter and buffer along the recorded axes and refreshes the shape attributes of the
standard modules (``in_features``, ``out_channels``, ``groups``, ``normalized_shape``, ...);
a weight tied between two layers is sliced once and the tie restored.

Example::

    plan = GraphPlan(model, example_inputs)
    groups = plan.groups()                  # [ChannelGroup], blocked ones say why
    smaller = plan.remove(model, [(groups[0], [3, 1])])   # a new module without those units
"""

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from metaprune.errors import UnsupportedModelError
from metaprune.graph import to_graph
from metaprune.graph.features import SCALAR, SLOT
from metaprune.pruning.groups import (
    ChannelGroup,
    LayerUse,
    build_dependency_graph,
    collect_groups,
    output_layers,
)

# node kinds whose channels are data, not model width: never removed
_FIXED_KINDS = {"input": "the model's input", "vocabulary": "a vocabulary",
                "position": "token positions (a Linear over tokens)"}
# layers whose shape attributes this module cannot refresh: their channels stay
_UNSLICEABLE = (nn.MultiheadAttention, nn.modules.conv._ConvTransposeNd, nn.LSTM, nn.GRU, nn.RNN)


@dataclass
class AxisRecord:
    """One prunable axis of a parameter or buffer: entry i along `dim` is channel `labels[i]`."""

    tensor: str  # parameter / buffer name
    dim: int
    labels: torch.Tensor  # node id of every entry along `dim`
    unit: str  # the module charged for it in the cost model
    side: str  # "out" or "in" of that module
    is_parameter: bool
    tied_to: str = ""  # a tied weight: the parameter it shares storage with (sliced there)


def plan_channel_groups(model: nn.Module, example_inputs: Sequence):
    """``(dependency graph, groups)`` of a model: from the channel graph when it holds structure
    torch-pruning couples wrongly (`needs_graph_coupling`), else from torch-pruning as before.

    The first element answers the cost model's questions (a `tp.DependencyGraph` or a
    `GraphDims`).
    """
    try:
        graph = to_graph(model, example_inputs)
    except UnsupportedModelError:
        graph = None
    if graph is not None and needs_graph_coupling(graph):
        plan = GraphPlan(model, example_inputs, graph)
        return plan.dims(), plan.groups()
    DG = build_dependency_graph(model, example_inputs)
    return DG, collect_groups(DG, output_layers(DG))


def needs_graph_coupling(graph) -> bool:
    """Whether the model holds structure torch-pruning's groups get wrong (see module doc)."""
    return bool(graph.couplings) or graph.functional_norms > 0 or any(
        layer.tied for layer in graph.layers)


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


class GraphPlan:
    """The coupled channel units of one model, read from its channel graph.

    Args:
        model: the (dense) model the groups describe; `remove` prunes copies of it.
        example_inputs: inputs of one forward pass.
        graph: its `NetworkGraph` when already built (else traced here).
    """

    def __init__(self, model: nn.Module, example_inputs: Sequence, graph=None) -> None:
        self.graph = graph if graph is not None else to_graph(model, example_inputs)
        self.modules = dict(model.named_modules())
        tensors = dict(model.named_parameters(remove_duplicate=False))
        self.parameter_names = set(tensors)
        tensors.update(model.named_buffers(remove_duplicate=False))
        self.shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        self.named_parameters = dict(model.named_parameters())
        self.num_nodes = self.graph.num_nodes
        self.unremovable: dict[int, str] = {}  # node -> why it stays
        self.records: list[AxisRecord] = []
        self._read_blocks()
        self._read_slots()
        self._fixed_nodes()
        self.component = self._components()

    # -- what each parameter axis holds --------------------------------------------------
    def _unsliceable(self, module_name: str) -> str | None:
        parts = module_name.split(".") if module_name else []
        for depth in range(len(parts), -1, -1):
            module = self.modules.get(".".join(parts[:depth]))
            if isinstance(module, _UNSLICEABLE):
                return f"{type(module).__name__} '{'.'.join(parts[:depth])}'"
        return None

    def _pin(self, nodes: torch.Tensor, reason: str) -> None:
        for node in torch.unique(nodes.reshape(-1)).tolist():
            if node >= 0:
                self.unremovable.setdefault(node, reason)

    def _read_blocks(self) -> None:
        for block in self.graph.blocks:
            name = block.param or block.tied
            if not name:
                continue  # identity edges: coupling only
            module_name = _owner(name)
            module = self.modules.get(module_name)
            reason = self._unsliceable(module_name)
            if reason:
                self._pin(block.src_grid, f"{reason} cannot be resized here")
                self._pin(block.dst_grid, f"{reason} cannot be resized here")
                continue
            rows, cols = block.grid_shape
            # an embedding's rows are its tokens; a weight stored [in, out] (GPT-2's Conv1D)
            # has its inputs along the rows too: the grid says so
            rows_are_sources = isinstance(module, nn.Embedding) or (
                tuple(block.src_grid.shape) == (rows, 1) and rows > 1
                and tuple(block.dst_grid.shape) == (1, cols))
            row_grid, col_grid = (block.src_grid, block.dst_grid) if rows_are_sources \
                else (block.dst_grid, block.src_grid)
            row_side, col_side = ("in", "out") if rows_are_sources else ("out", "in")
            if tuple(row_grid.shape) == (rows, 1):
                self._add(name, 0, row_grid[:, 0], module_name, row_side, block.tied)
            if tuple(col_grid.shape) == (1, cols):
                labels = col_grid[0]
                if block.col_perm is not None:  # flatten -> Linear: several columns per node
                    per_node = block.view[1] // labels.numel()
                    ordered = torch.empty(block.view[1], dtype=torch.long)
                    ordered[block.col_perm] = labels.repeat_interleave(per_node)
                    labels = ordered
                self._add(name, 1, labels, module_name, col_side, block.tied)
            # a grid varying along both axes (grouped convolution): its input axis stays, the
            # groups are coupled whole by the graph

    def _read_slots(self) -> None:
        for slot in self.graph.slots:
            shape = self.shapes[slot.name]
            dims = [d for d, size in enumerate(shape) if size > 1] or [0]
            module_name = _owner(slot.name)
            reason = self._unsliceable(module_name)
            if reason:
                self._pin(slot.nodes, f"{reason} cannot be resized here")
                continue
            norm = slot.slot in (SLOT["norm_weight"], SLOT["norm_bias"],
                                 SLOT["norm_running_mean"], SLOT["norm_running_var"])
            unit = module_name if module_name in self.modules and (
                norm or slot.slot == SLOT["bias"]) else slot.name
            self._add(slot.name, dims[0], slot.nodes, unit, "out", "")

    def _add(self, tensor, dim, labels, unit, side, tied) -> None:
        tied_to = ""
        if tied:
            tied_to = next((layer.tied[tied] for layer in self.graph.layers
                            if tied in layer.tied), "")
        self.records.append(AxisRecord(tensor, dim, labels.reshape(-1).clone(), unit, side,
                                       tensor in self.parameter_names, tied_to))

    def _fixed_nodes(self) -> None:
        graph = self.graph
        for layer in graph.layers:
            if layer.kind in _FIXED_KINDS:
                nodes = torch.arange(layer.first_node, layer.first_node + layer.num_nodes)
                self._pin(nodes, f"{_FIXED_KINDS[layer.kind]} ('{layer.name}')")
        output = graph.data.x[:, SCALAR["is_output"]] > 0
        self._pin(torch.nonzero(output).reshape(-1), "reaches the model output")
        for nodes in graph.pinned:
            self._pin(nodes, "contracted with a tensor that has no channels (a constant)")

    def _components(self) -> torch.Tensor:
        src, dst = [], []
        channelwise = {i for i, layer in enumerate(self.graph.layers) if layer.channelwise}
        for block in self.graph.blocks:
            identity = not block.param and not block.tied
            if identity or block.layer in channelwise:
                shape = block.grid_shape
                src.append(block.src_grid.expand(shape).reshape(-1))
                dst.append(block.dst_grid.expand(shape).reshape(-1))
        for left, right in self.graph.couplings:
            src.append(left)
            dst.append(right)
        owners = {(r.tensor, r.dim): r.labels for r in self.records if not r.tied_to}
        for record in self.records:  # a tied weight: entry i of both layers goes together
            owner = owners.get((record.tied_to, record.dim)) if record.tied_to else None
            if owner is not None and owner.numel() == record.labels.numel():
                src.append(owner)
                dst.append(record.labels)
        a = torch.cat(src) if src else torch.zeros(0, dtype=torch.long)
        b = torch.cat(dst) if dst else torch.zeros(0, dtype=torch.long)
        valid = (a >= 0) & (b >= 0)  # couplings of dropped (unused) input labellings
        a, b = a[valid].numpy(), b[valid].numpy()
        matrix = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)),
                            shape=(self.num_nodes, self.num_nodes))
        _, labels = connected_components(matrix, directed=False)
        return torch.from_numpy(labels).long()

    # -- groups ---------------------------------------------------------------------------
    def groups(self) -> list[ChannelGroup]:
        """One `ChannelGroup` per set of units with the same footprint; blocked ones say why."""
        num_components = int(self.component.max()) + 1 if self.num_nodes else 0
        counts = torch.stack([
            torch.bincount(self.component[r.labels], minlength=num_components)
            for r in self.records
        ]) if self.records else torch.zeros(0, num_components, dtype=torch.long)
        blocked: dict[int, str] = {}
        for node, reason in self.unremovable.items():
            blocked.setdefault(int(self.component[node]), reason)
        footprints: dict[tuple, list[int]] = {}
        for c in range(num_components):
            column = counts[:, c]
            if not bool(column.any()):
                continue  # channels of no parameter (a merge feeding nothing prunable)
            key = (blocked.get(c), tuple(column.tolist()))
            footprints.setdefault(key, []).append(c)
        groups = []
        for (reason, column), components in footprints.items():
            uses, seen = [], set()
            for record, count in zip(self.records, column):
                if count == 0 or record.tied_to or (record.unit, record.side) in seen:
                    continue
                seen.add((record.unit, record.side))
                uses.append(LayerUse(record.unit, record.side,
                                     torch.full((len(components),), count, dtype=torch.long)))
            uses += self._attention_uses(components)
            root = next((u.unit for u in uses if u.side == "out"), uses[0].unit if uses else "")
            group = ChannelGroup(root=root, handler=None, size=len(components), uses=uses,
                                 blocked=reason, plan=self,
                                 components=torch.tensor(components, dtype=torch.long))
            if group.size <= 1 and group.blocked is None:
                group.blocked = "a single channel"
            groups.append(group)
        return groups

    def attention_modules(self) -> dict[str, torch.Tensor]:
        """Module path -> component of each of its heads (the attention products there)."""
        found = {}
        for where, heads in self.graph.head_splits:
            if where in self.modules and where not in found:
                found[where] = self.component[heads]
        return found

    def _attention_uses(self, components: list[int]) -> list[LayerUse]:
        """The attention products' MACs scale with the heads kept: charge them to the module
        that computes them, one head per unit of these components."""
        uses = []
        for where, head_components in self.attention_modules().items():
            per_unit = torch.tensor([int((head_components == c).sum()) for c in components])
            if bool(per_unit.any()):
                uses.append(LayerUse(where, "out", per_unit))
        return uses

    def dims(self) -> "GraphDims":
        return GraphDims(self)

    # -- scoring --------------------------------------------------------------------------
    def score(self, group: ChannelGroup, criterion, model: nn.Module) -> torch.Tensor | None:
        """Importance of each unit of `group` (higher: keep), summed over its parameters.

        `l1`/`l2` (magnitude), `taylor` (|w·g|), `hessian` (w²·g with the squared-gradient
        statistic), `bn_scale` (norm scales, else l1) and `random`; None for other criteria.
        """
        name = criterion.name
        if name == "random":
            generator = torch.Generator().manual_seed(len(group.components))
            return torch.rand(group.size, generator=generator)
        tensors = dict(model.named_parameters(remove_duplicate=False))
        position = torch.full((int(self.component.max()) + 1,), -1, dtype=torch.long)
        position[group.components] = torch.arange(group.size)
        per_record = []
        for record in self.records:
            if not record.is_parameter or record.tied_to:
                continue
            if name == "bn_scale" and not record.tensor.endswith("weight"):
                continue
            weight = tensors[record.tensor].detach()
            per_entry = _entry_importance(name, weight, tensors[record.tensor].grad, record.dim)
            if per_entry is None:
                return None
            index = position[self.component[record.labels]]
            keep = index >= 0
            if not bool(keep.any()):
                continue
            scores = torch.zeros(group.size, dtype=torch.float64)
            scores.index_add_(0, index[keep], per_entry[keep].double())
            per_record.append(scores)
        if not per_record:
            return None
        total = torch.stack(per_record).sum(0)
        mean = total.mean()
        return (total / mean if mean > 0 else total).float()

    # -- removal --------------------------------------------------------------------------
    def remove(self, dense: nn.Module, removed: list) -> nn.Module:
        """A copy of `dense` without the units ``group.components[i]`` of every
        ``(group, indices)`` pair in `removed`.

        Args:
            dense: the model the plan was built from (or a copy with the same names).
            removed: ``(group, indices of its units to remove)`` pairs.
        """
        gone = torch.zeros(self.num_nodes, dtype=torch.bool)
        for group, indices in removed:
            if len(indices):
                components = group.components[torch.as_tensor(list(indices), dtype=torch.long)]
                gone |= torch.isin(self.component, components)
        model = copy.deepcopy(dense)
        if not bool(gone.any()):
            return model
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(model.named_buffers(remove_duplicate=False))
        current = {}
        kept_by_axis: dict[tuple[str, int], torch.Tensor] = {}
        for record in self.records:
            keep = ~gone[record.labels]
            if record.tied_to:
                owner_keep = kept_by_axis.get((record.tied_to, record.dim))
                if owner_keep is not None and not torch.equal(owner_keep, keep):
                    raise UnsupportedModelError(
                        f"tied weights '{record.tensor}' and '{record.tied_to}' would lose "
                        "different channels; the channels between them are reordered")
                continue
            kept_by_axis[(record.tensor, record.dim)] = keep
            if bool(keep.all()):
                continue
            value = current.get(record.tensor, tensors[record.tensor].detach())
            current[record.tensor] = value.index_select(record.dim, torch.nonzero(keep)[:, 0])
        old_widths = {name: _width(module) for name, module in model.named_modules()}
        old_bias = {name: module.bias.shape[0] for name, module in model.named_modules()
                    if not isinstance(module, _STANDARD)
                    and isinstance(getattr(module, "bias", None), torch.Tensor)
                    and module.bias.dim() == 1}
        for name, value in current.items():
            module = model.get_submodule(_owner(name))
            attr = name.rsplit(".", 1)[-1]
            if attr in module._parameters:
                old = module._parameters[attr]
                module._parameters[attr] = nn.Parameter(value.contiguous(),
                                                        requires_grad=old.requires_grad)
            else:
                module._buffers[attr] = value.contiguous()
        for record in self.records:  # restore ties: the tied layer shares the new tensor
            if record.tied_to:
                owner = model.get_submodule(_owner(record.tied_to))
                module = model.get_submodule(_owner(record.tensor))
                setattr(module, record.tensor.rsplit(".", 1)[-1],
                        getattr(owner, record.tied_to.rsplit(".", 1)[-1]))
        touched = {_owner(name) for name in current} | {
            _owner(r.tensor) for r in self.records if r.tied_to}
        for name in touched:
            _refresh_attributes(model.get_submodule(name), old_widths.get(name))
            if name in old_bias:
                _refresh_output_width(model.get_submodule(name), old_bias[name])
        for where, heads in self.graph.head_splits:
            kept = int((~gone[heads]).sum())
            if kept < heads.numel():
                _refresh_head_counts(model.get_submodule(where), heads.numel(), kept)
        model.zero_grad(set_to_none=True)
        return model


def _refresh_head_counts(module: nn.Module, before: int, after: int) -> None:
    """Integer attributes of an attention module that count its heads, after removing heads.

    Attention code states head counts as attributes (``self.num_attention_heads``,
    ``self.all_head_size``, GPT-2's ``self.split_size``) in its reshapes and splits. An
    attribute equal to the old head count becomes the new one, and one equal to the old count
    times the per-head size (an attribute named like ``head_dim`` / ``attention_head_size``)
    scales with it; per-head sizes never change. The pruned model is then run and checked, so
    code that states the counts otherwise is refused (its heads are left alone).
    """
    ints = {name: value for name, value in vars(module).items()
            if type(value) is int and not name.startswith("_")}
    per_head = {name: value for name, value in ints.items()
                if "head" in name and ("dim" in name or "size" in name) and "all" not in name}
    head_size = next(iter(per_head.values()), None)
    for name, value in ints.items():
        if name in per_head:
            continue
        if value == before:
            setattr(module, name, after)
        elif head_size and value == before * head_size:
            setattr(module, name, after * head_size)


def _refresh_output_width(module: nn.Module, before: int) -> None:
    """A non-standard layer computing a functional linear (GPT-2's ``Conv1D`` keeps its output
    width as ``self.nf`` for a reshape): an integer attribute equal to its old output width
    (its bias's length) becomes the new one. The pruned model is run and checked afterwards."""
    after = module.bias.shape[0]
    if after == before:
        return
    for name, value in list(vars(module).items()):
        if type(value) is int and not name.startswith("_") and value == before:
            setattr(module, name, after)


def _entry_importance(name, weight, grad, dim) -> torch.Tensor | None:
    """Per-entry importance along `dim` of one parameter."""
    rows = weight.movedim(dim, 0).reshape(weight.shape[dim], -1)
    if name in ("l2",):
        return rows.pow(2).sum(1)
    if name in ("l1", "bn_scale"):
        return rows.abs().sum(1)
    if name in ("taylor", "hessian"):
        if grad is None:
            return torch.zeros(weight.shape[dim])
        g = grad.movedim(dim, 0).reshape(weight.shape[dim], -1)
        return (rows * g).abs().sum(1) if name == "taylor" else (rows.pow(2) * g).sum(1) / 2
    return None


# modules whose shape attributes `_refresh_attributes` knows
_STANDARD = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.GroupNorm, nn.LayerNorm,
             nn.modules.batchnorm._NormBase)


def _width(module: nn.Module):
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels, module.groups
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, module.num_groups
    return None


def _refresh_attributes(module: nn.Module, old) -> None:
    """Shape attributes of a standard module from its (sliced) parameters."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        out_channels, groups = old
        if groups > 1:  # whole groups (or depthwise channels) went: same size per group
            per_group = out_channels // groups
            module.groups = weight.shape[0] // per_group
        module.out_channels = weight.shape[0]
        module.in_channels = weight.shape[1] * module.groups
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = weight.shape
    elif isinstance(module, nn.GroupNorm):
        channels, groups = old
        size = weight.shape[0]
        module.num_groups = size // (channels // groups)
        module.num_channels = size
    elif isinstance(module, nn.LayerNorm) and weight is not None:
        module.normalized_shape = (weight.shape[0],)
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        reference = weight if weight is not None else module.running_mean
        module.num_features = reference.shape[0]


class GraphDims:
    """The two questions the cost model asks a dependency graph, answered from a `GraphPlan`."""

    def __init__(self, plan: GraphPlan) -> None:
        totals: dict[tuple[str, str], int] = {}
        for record in plan.records:
            if not record.tied_to:
                totals.setdefault((record.unit, record.side), record.labels.numel())
        self._out, self._in, self.module2node = {}, {}, {}
        for (unit, side), total in totals.items():
            key = plan.modules.get(unit, plan.named_parameters.get(unit))
            self.module2node[key] = None
            (self._out if side == "out" else self._in)[key] = total
        for where, heads in plan.attention_modules().items():
            module = plan.modules[where]
            self.module2node[module] = None
            self._out.setdefault(module, heads.numel())

    def get_out_channels(self, unit):
        return self._out.get(unit)

    def get_in_channels(self, unit):
        return self._in.get(unit)


def attention_heads(model: nn.Module, example_inputs) -> dict[str, int]:
    """Module path -> attention heads: the size of the head axis of the attention products
    traced there (``q @ k^T``, ``scaled_dot_product_attention``), or
    ``nn.MultiheadAttention.num_heads``; {} when the model cannot be traced."""
    heads = {name: m.num_heads for name, m in model.named_modules()
             if isinstance(m, nn.MultiheadAttention)}
    try:
        graph = to_graph(model, example_inputs)
    except UnsupportedModelError:
        return heads
    for where, per_head in graph.head_splits:
        heads[where] = max(heads.get(where, 0), int(per_head.numel()))
    return heads
