"""Between the sparsity head (one keep ratio per graph layer) and pruning policies (module name
-> keep ratio of the channel group that module roots, as `metaprune.pruning` allocates them)."""

from collections.abc import Sequence

import torch
from torch import nn


def group_policy(module: nn.Module, example_inputs: Sequence[torch.Tensor],
                 ratio_of_layer: dict[str, float]) -> dict[str, float]:
    """Per-layer keep ratios -> a policy the pruning engine accepts.

    The engine allocates per channel group (coupled layers, e.g. a ResNet stage's convolutions
    feeding one residual sum): each group takes the mean ratio of its layers that own output
    channels and is named by its root module. Groups the engine must not prune (model outputs,
    unsupported operators) are left out, so the policy never asks for the impossible. `module`'s
    train/eval modes are left as they were.

    Example::

        group_policy(model, (x,), {"conv1": 0.5, "conv2": 0.7, "fc": 0.9})
        # {'conv1': 0.5, 'conv2': 0.7}     ('fc' produces the model's outputs)
    """
    from metaprune.pruning.groups import build_dependency_graph, collect_groups, output_layers

    fallback = sum(ratio_of_layer.values()) / max(len(ratio_of_layer), 1)
    modes = {m: m.training for m in module.modules()}
    try:
        DG = build_dependency_graph(module, tuple(example_inputs))  # sets eval mode
    finally:
        for m, training in modes.items():
            m.training = training
    policy = {}
    for group in collect_groups(DG, output_layers(DG)):
        if group.blocked:
            continue
        owned = [ratio_of_layer[use.unit] for use in group.uses
                 if use.side == "out" and use.unit in ratio_of_layer]
        ratio = sum(owned) / len(owned) if owned else fallback
        policy[group.root] = min(max(ratio, 1e-3), 1.0)
    return policy


def policy_targets(graph, policy: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Training targets for the sparsity head from a policy (e.g. found by a policy search).

    Returns ``(layer_index, keep_ratio)``: the graph layers the policy names and their ratios,
    to compare with ``MetaNetwork(...)(graph, speedup)[2][layer_index]``.

    Example::

        index, target = policy_targets(graph, {"conv1": 0.5, "conv2": 0.7})
        keep = metanet(graph, speedup=2.0)[2]
        loss = F.mse_loss(keep[index], target)
    """
    index = {layer.name: i for i, layer in enumerate(graph.layers)}
    named = [(index[name], float(ratio)) for name, ratio in policy.items() if name in index]
    layers = torch.tensor([i for i, _ in named], dtype=torch.long)
    ratios = torch.tensor([r for _, r in named], dtype=graph.x.dtype)
    return layers, ratios
