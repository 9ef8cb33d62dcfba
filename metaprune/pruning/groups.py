"""Channel groups: which channels must be removed together, and which layers they touch.

Coupling comes from Torch-Pruning's `DependencyGraph` (residual adds, concatenations,
depthwise convolutions, flatten→Linear, `nn.MultiheadAttention`). On top of it we record, for
every group, how many input/output entries of every parametrised layer each root channel
accounts for — the raw material of the analytic cost model — and we decide which groups must
not be touched: those that reach the model's output (the classifier's classes, a decoder's
output channels) and those that hold layers whose channel structure Torch-Pruning would break.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from metaprune.errors import UnsupportedModelError

ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)
# Layers that consume channels: the output of a layer whose channels reach the model's output
# without passing one of these is an output layer and keeps all its channels.
CONSUMER_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention, nn.Embedding,
                  nn.LSTM)


@dataclass
class LayerUse:
    """How one parametrised layer (a "unit") depends on the channels of a group.

    Attributes:
        unit: name of the module or unwrapped parameter.
        side: `"out"` (its output channels are removed) or `"in"` (its input channels are).
        multiplicity: for every root channel, how many of the unit's channels go with it
            (1 normally, H·W for a convolution flattened into a Linear).
    """

    unit: str
    side: str
    multiplicity: torch.Tensor


@dataclass
class ChannelGroup:
    """One set of coupled channels, identified by its root layer's name.

    Attributes:
        root: module name of the root layer (its output channels index the group).
        handler: Torch-Pruning's out-channel pruning function of the root.
        size: number of root channels.
        uses: layers touched, see `LayerUse`.
        step: the group keeps a multiple of this many channels, or all of them (attention
            heads must stay equal; `round_to` makes widths hardware-friendly).
        head_of_channel: for attention groups, the head each root channel belongs to, so that
            every head loses the same number of channels.
        blocked: why the group must not be pruned, or None.
        emptiable: whether the group may lose all its channels (depth pruning): set by
            `depth.mark_emptiable` where the model's output still depends on its input without
            them (a residual branch); never for a group every path runs through.
    """

    root: str
    handler: Callable
    size: int
    uses: list[LayerUse] = field(default_factory=list)
    step: int = 1
    head_of_channel: torch.Tensor | None = None
    blocked: str | None = None
    emptiable: bool = False
    dependency_group: object = field(default=None, repr=False)  # the tp.Group, for scoring
    # groups read from the channel graph (`metaprune.pruning.graph_groups`): the plan that
    # scores and removes them, and the coupled-channel units (component ids) of the group
    plan: object = field(default=None, repr=False)
    components: torch.Tensor | None = field(default=None, repr=False)


def build_dependency_graph(model: nn.Module, example_inputs: Sequence[torch.Tensor]):
    """Traces `model` once with Torch-Pruning (puts it in eval mode)."""
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=tuple(example_inputs),
                                                     verbose=False)
    except (RuntimeError, ValueError, AssertionError, IndexError, KeyError, TypeError) as error:
        raise UnsupportedModelError(
            f"cannot trace the model's channel dependencies ({type(error).__name__}: {error})"
        ) from error


def unit_name(DG, target) -> str | None:
    """Name of a dependency target: a module path or an unwrapped parameter's name."""
    if isinstance(target, nn.Parameter):
        return DG._param_to_name.get(target)
    return DG._module2name.get(target)


def output_layers(DG) -> set[nn.Module]:
    """Root-type layers whose output channels reach the model's output unconsumed."""
    found = set()
    for module, node in DG.module2node.items():
        if not isinstance(module, ROOT_TYPES):
            continue
        stack, seen = [node], set()
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if current is not node and isinstance(current.module, CONSUMER_TYPES):
                continue
            if not current.outputs:
                found.add(module)
                break
            stack.extend(current.outputs)
    return found


def _block_reason(module) -> str | None:
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 \
            and module.groups != module.out_channels:
        return f"grouped convolution with {module.groups} groups"
    if isinstance(module, nn.GroupNorm) and module.num_groups not in (1, module.num_channels):
        return f"GroupNorm with {module.num_groups} groups"
    if isinstance(module, nn.MultiheadAttention) and not module._qkv_same_embed_dim:
        return "MultiheadAttention with separate key/value dimensions"
    if isinstance(module, nn.LSTM):
        return "LSTM"
    return None


def _indices_fit(DG, module, side: str, idxs) -> bool:
    """Whether a group's indices exist in the layer they point at (torch-pruning sometimes maps
    channels through reshapes it does not understand onto indices past the layer's width)."""
    if not idxs or module not in DG.module2node:
        return True
    width = DG.get_out_channels(module) if side == "out" else DG.get_in_channels(module)
    return width is None or max(idxs) < width


def _multiplicity(root_idxs, size: int) -> torch.Tensor:
    valid = [r for r in root_idxs if r is not None]
    if not valid:
        return torch.zeros(size, dtype=torch.long)
    return torch.bincount(torch.tensor(valid, dtype=torch.long), minlength=size)


def _attention_layout(group, size: int) -> tuple[int, torch.Tensor | None, str | None]:
    """Step and per-channel head index for groups that contain attention layers."""
    layouts = set()
    head_of_channel = None
    for item in group:
        layer = item.dep.target.module
        if not isinstance(layer, nn.MultiheadAttention):
            continue
        layouts.add((layer.num_heads, layer.embed_dim))
        head_dim = layer.embed_dim // layer.num_heads
        heads = torch.full((size,), -1, dtype=torch.long)
        for idx, root in zip(item.idxs, item.root_idxs):
            if root is not None:
                heads[root] = idx // head_dim
        head_of_channel = heads
    if not layouts:
        return 1, None, None
    if len(layouts) > 1 or (head_of_channel < 0).any():
        return 1, None, "attention layers with different head layouts share these channels"
    num_heads = layouts.pop()[0]
    return num_heads, head_of_channel, None


def collect_groups(DG, protected: set[nn.Module]) -> list[ChannelGroup]:
    """Every channel group of the traced model, with layer uses and blocking reasons.

    Args:
        DG: a built `tp.DependencyGraph`.
        protected: layers whose output channels must stay (e.g. `output_layers(DG)`).
    """
    groups = []
    for group in DG.get_all_groups(root_module_types=ROOT_TYPES):
        root_dep, root_idxs = group[0]
        size = len(root_idxs)
        channel_group = ChannelGroup(
            root=DG._module2name[root_dep.target.module], handler=root_dep.handler, size=size,
            dependency_group=group,
        )
        for item in group:
            dep = item.dep
            module = dep.target.module
            side = "out" if DG.is_out_channel_pruning_fn(dep.handler) else "in"
            if side == "out" and module in protected:
                channel_group.blocked = f"reaches the model output through {unit_name(DG, module)}"
            reason = _block_reason(module) if isinstance(module, nn.Module) else None
            if reason is None and not _indices_fit(DG, module, side, item.idxs):
                reason = ("channels the dependency graph cannot map consistently (an operator "
                          "that reshapes channels into another axis, e.g. a fused qkv split or a "
                          "Linear over tokens)")
            if reason and channel_group.blocked is None:
                channel_group.blocked = f"{reason} at {unit_name(DG, module)}"
            name = unit_name(DG, module)
            if name is None:
                continue  # functional ops (add, cat, reshape) carry no parameters
            channel_group.uses.append(LayerUse(name, side, _multiplicity(item.root_idxs, size)))
        step, heads, reason = _attention_layout(group, size)
        channel_group.step, channel_group.head_of_channel = step, heads
        if reason and channel_group.blocked is None:
            channel_group.blocked = reason
        if size <= 1 and channel_group.blocked is None:
            channel_group.blocked = "a single channel"
        groups.append(channel_group)
    return groups


def minimum_kept(size: int, step: int, min_keep_fraction: float) -> int:
    """Channels a group keeps at least: the floor fraction, rounded up to a multiple of `step`."""
    keep = max(1, math.ceil(size * min_keep_fraction))
    return min(size, math.ceil(keep / step) * step)


def snap_removal(count: float, size: int, step: int, limit: int) -> int:
    """The largest removal <= `count` and <= `limit` that leaves a multiple of `step` (or 0).

    Example::

        snap_removal(5, size=20, step=8, limit=16)   # 4: keeps 16
        snap_removal(3, size=20, step=8, limit=16)   # 0: keeping 17..19 is not a multiple of 8
    """
    offset = size % step
    count = min(float(count), float(limit))
    if count + 1e-9 < max(offset, 1):
        return 0
    return int(offset + math.floor((count - offset) / step + 1e-9) * step)


def removal_neighbours(count: int, size: int, step: int, limit: int) -> list[int]:
    """The allowed removals one step below and above `count` (within 0..`limit`)."""
    offset = size % step
    below = 0 if count <= max(offset, step if offset == 0 else offset) else count - step
    above = (offset or step) if count == 0 else count + step
    return [r for r in (below, above) if r != count and 0 <= r <= limit]


def first_removal(size: int, step: int) -> int:
    """The smallest non-zero removal that leaves a multiple of `step`."""
    return size % step or step
