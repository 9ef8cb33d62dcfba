"""The GNN metanetwork: rewrites a network's weights so they are easy to prune, and proposes
per-layer keep ratios, for any architecture `metaprune.graph` converts.

- `MetaNetwork`: the PyG model, ``forward(data, speedup) -> (new_x, new_edge_attr, keep)``;
  ``message="mlp"`` (an MLP on every edge, `layers`) or ``"linear"`` (messages linear in the
  weights, a matmul per weight block, `linear_messages`: the ``"fast"`` checkpoint).
- `metanet_parameters(metanet, graph)`: rewritten parameters, differentiable, for
  ``torch.func.functional_call`` in meta-training; `GroupSparsity` the DepGraph regulariser.
- `save_metanet` / `load_metanet`: safetensors + JSON config; `load_metanet` returns a
  `LoadedMetanet`, the object `metaprune.prune(method="metanet")` calls.
- `policy_targets` / `group_policy`: sparsity-head outputs <-> pruning policies.

Example::

    from metaprune.graph import to_graph
    from metaprune.metanet import MetaNetwork, load_metanet, metanet_parameters, save_metanet

    metanet = MetaNetwork(hidden=32, num_layers=3)
    graph = to_graph(model, (x,))
    params = metanet_parameters(metanet, graph, speedup=2.0)
    loss = F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    save_metanet(metanet, "metanet.safetensors", training={"steps": 1})
    rewritten = load_metanet("metanet.safetensors").transform(model, (x,))
"""

from metaprune.metanet.checkpoint import read_metanet, save_metanet, validate_config
from metaprune.metanet.network import (
    DEFAULT_SPEEDUP,
    MetaNetwork,
    metanet_parameters,
    parameters_from_features,
)
from metaprune.metanet.policy import group_policy, policy_targets
from metaprune.metanet.regularizer import GroupSparsity, group_sparsity
from metaprune.metanet.scope import (
    CheckpointInfo,
    choose_checkpoint,
    discover_checkpoints,
    scope_of,
)
from metaprune.metanet.seam import LoadedMetanet, load_metanet

__all__ = [
    "CheckpointInfo",
    "DEFAULT_SPEEDUP",
    "GroupSparsity",
    "LoadedMetanet",
    "MetaNetwork",
    "group_policy",
    "group_sparsity",
    "load_metanet",
    "choose_checkpoint",
    "discover_checkpoints",
    "metanet_parameters",
    "parameters_from_features",
    "policy_targets",
    "read_metanet",
    "save_metanet",
    "scope_of",
    "validate_config",
]
