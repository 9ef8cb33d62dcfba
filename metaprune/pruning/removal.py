"""Physical channel removal on a copy of the model, and the checks that it still works."""

import copy
from importlib import import_module

import torch
from torch import nn

from metaprune.errors import UnsupportedModelError
from metaprune.pruning.empty_layers import collapse_empty_layers
from metaprune.pruning.groups import build_dependency_graph, first_removal


def forward_outputs(model: nn.Module, example_inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        output = model(*example_inputs)
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    return [t for t in output if isinstance(t, torch.Tensor)]


def _refresh_shapes(model: nn.Module, example_inputs) -> None:
    """Recomputes shape constants baked into fx graphs (models loaded from .pt2)."""
    if not isinstance(model, torch.fx.GraphModule):
        return
    try:
        refresh = getattr(import_module("metaprune.formats"), "refresh_shapes", None)
    except ImportError:
        refresh = None
    if refresh is not None:
        refresh(model, example_inputs)


def remove_channels(dense: nn.Module, example_inputs, groups, orders, counts) -> nn.Module:
    """A pruned copy of `dense`: group i loses the first counts[i] channels of orders[i].

    A group that loses all its channels (depth pruning) leaves layers with no channels on one
    side; they become what they compute (`empty_layers.collapse_empty_layers`)."""
    plan = next((g.plan for g in groups if g.plan is not None), None)
    if plan is not None:  # groups read from the channel graph remove themselves
        model = plan.remove(dense, [(group, [int(i) for i in order[:count]])
                                    for group, order, count in zip(groups, orders, counts)
                                    if count])
        collapse_empty_layers(model)
        _refresh_shapes(model, example_inputs)
        return model
    model = copy.deepcopy(dense)
    DG = build_dependency_graph(model, example_inputs)
    modules = dict(model.named_modules())
    for group, order, count in zip(groups, orders, counts):
        if count == 0:
            continue
        idxs = sorted(int(i) for i in order[:count])
        try:
            DG.get_pruning_group(modules[group.root], group.handler, idxs).prune()
        # TypeError: torch-pruning cannot remove every channel of some layers (an empty index
        # list becomes a float tensor), so such a group is not emptied
        except (RuntimeError, ValueError, AssertionError, IndexError, TypeError) as error:
            raise UnsupportedModelError(
                f"removing channels of {group.root!r} failed ({type(error).__name__}: {error}); "
                "an operator around it couples channels in a way the dependency graph does not "
                "track"
            ) from error
    model.zero_grad(set_to_none=True)
    collapse_empty_layers(model)
    _refresh_shapes(model, example_inputs)
    return model


def check_pruned(model: nn.Module, example_inputs, reference_shapes) -> None:
    try:
        shapes = [tuple(t.shape) for t in forward_outputs(model, example_inputs)]
    except (RuntimeError, ValueError, AssertionError) as error:
        raise UnsupportedModelError(
            f"the pruned model no longer runs ({type(error).__name__}: {error}); an operator in "
            "this model couples channels in a way the dependency graph does not track"
        ) from error
    if shapes != reference_shapes:
        raise UnsupportedModelError(
            f"pruning changed the model's output shapes from {reference_shapes} to {shapes}; "
            "an operator in this model hides an output dimension from the dependency graph"
        )


def block_breaking_groups(work: nn.Module, example_inputs, groups, orders) -> int:
    """Blocks every group whose smallest removal alone breaks the model; returns how many.

    Runs only after a pruned model failed its check: the dependency graph sometimes couples
    channels wrongly around operators it cannot follow (a fused qkv reshape), and the rest of
    the model can still be pruned safely without those groups.
    """
    reference_shapes = [tuple(t.shape) for t in forward_outputs(work, example_inputs)]
    blocked = 0
    for index, group in enumerate(groups):
        if group.blocked:
            continue
        counts = [first_removal(group.size, group.step) if i == index else 0
                  for i in range(len(groups))]
        try:
            probe = remove_channels(work, example_inputs, groups, orders, counts)
            check_pruned(probe, example_inputs, reference_shapes)
        except UnsupportedModelError as error:
            group.blocked = f"removing its channels breaks the model: {error}"
            blocked += 1
    return blocked
