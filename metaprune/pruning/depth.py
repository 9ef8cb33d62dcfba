"""Depth pruning: which channel groups may lose every channel, and a check that none cut the model.

Emptying a group removes a whole path: a residual branch whose inner width goes to 0 adds a
constant to its stream (`empty_layers`), so the block's time goes with its MACs (on a CPU that
computes 16 channels at a time, narrowing a 16-channel layer to 8 halves its MACs but not its
time). A group may be emptied only where the model still works without it, and that is read
from the model, not from its architecture: the group alone is removed and the model run on two
different inputs. Where every path from input to output runs through the group (any layer of a
plain chain, a residual stream's own channels) the outputs no longer depend on the input, so
the group keeps channels. Two groups that are each optional can still form a cut together
(two parallel branches without a skip), so the pruned model is checked the same way
(`check_connected`); the engine then prunes again without emptying any group.

Example::

    mark_emptiable(groups, model, example_inputs, orders)   # sets group.emptiable
    [g.root for g in groups if g.emptiable]   # a ResNet's conv1 of every block
"""

import torch
from torch import nn

from metaprune.errors import UnsupportedModelError
from metaprune.pruning.removal import check_pruned, forward_outputs, remove_channels

_SEED = 0
_SAME = 1e-6  # outputs closer than this (relative) do not depend on the input


def _other_inputs(example_inputs) -> tuple | None:
    """Inputs of the same shapes with other values; None when an input is not floating point
    (token ids cannot be redrawn without knowing the vocabulary)."""
    generator = torch.Generator().manual_seed(_SEED)
    other = []
    for tensor in example_inputs:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            return None
        other.append(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
    return tuple(other)


def _depends_on_input(model: nn.Module, example_inputs, other_inputs) -> bool:
    was_training = model.training
    model.eval()  # batch statistics would mix the samples
    try:
        first = forward_outputs(model, example_inputs)
        second = forward_outputs(model, other_inputs)
    finally:
        model.train(was_training)
    for a, b in zip(first, second):
        scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12) if a.numel() else 1.0
        if a.numel() and float((a - b).abs().max()) > _SAME * scale:
            return True
    return False


def mark_emptiable(groups, model: nn.Module, example_inputs, orders) -> int:
    """Sets ``group.emptiable`` on every unblocked group the model works without; returns how
    many. Each candidate is removed alone from a copy of `model` and checked: the model runs,
    its output shapes are unchanged and its outputs still depend on its input.

    Args:
        groups: the model's channel groups (blocked ones are left alone).
        model: the dense model the groups describe.
        example_inputs: inputs of one forward pass (floating point; else nothing is marked).
        orders: per group, its removal order (any order: all channels go).
    """
    other = _other_inputs(example_inputs)
    if other is None or not _depends_on_input(model, example_inputs, other):
        return 0
    reference_shapes = [tuple(t.shape) for t in forward_outputs(model, example_inputs)]
    marked = 0
    for index, group in enumerate(groups):
        if group.blocked:
            continue
        counts = [group.size if i == index else 0 for i in range(len(groups))]
        try:
            emptied = remove_channels(model, example_inputs, groups, orders, counts)
            check_pruned(emptied, example_inputs, reference_shapes)
        except UnsupportedModelError:
            continue
        group.emptiable = _depends_on_input(emptied, example_inputs, other)
        marked += group.emptiable
    return marked


class DisconnectedError(UnsupportedModelError):
    """The emptied groups together leave the model's outputs independent of its input."""


def check_connected(pruned: nn.Module, example_inputs) -> None:
    """Raises `DisconnectedError` when the pruned model's outputs no longer depend on its input:
    emptied groups that together cut every path, or (seen on a small ResNet with random
    BatchNorm statistics) a stream so narrowed that the ReLUs after the emptied blocks pass
    nothing that varies."""
    other = _other_inputs(example_inputs)
    if other is not None and not _depends_on_input(pruned, example_inputs, other):
        raise DisconnectedError(
            "the emptied channel groups together cut every path from the input to the output "
            "(parallel branches without a skip, or a stream narrowed until nothing varies)")
