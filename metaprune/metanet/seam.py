"""`LoadedMetanet`: the object the pruning engine calls (see `metaprune.pruning.metanet_bridge`)."""

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from metaprune.errors import InvalidTargetError, MetaPruneError
from metaprune.graph import to_graph
from metaprune.metanet.checkpoint import read_metanet
from metaprune.metanet.network import DEFAULT_SPEEDUP, MetaNetwork
from metaprune.metanet.policy import group_policy
from metaprune.vocabulary.checkpoints import resolve_checkpoint


def _as_tuple(example_inputs) -> tuple:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _target_speedup(speedup, params_ratio) -> float:
    """The MACs speed-up the sparsity head is conditioned on, from either target."""
    if speedup is not None and params_ratio is not None:
        raise InvalidTargetError("give a speed-up or a params ratio, not both")
    if speedup is not None:
        if not speedup >= 1:
            raise InvalidTargetError(f"speedup must be >= 1, got {speedup}")
        return float(speedup)
    if params_ratio is not None:
        if not 0 < params_ratio <= 1:
            raise InvalidTargetError(f"params_ratio must be in (0, 1], got {params_ratio}")
        # params, like MACs, scale with kept-in x kept-out channels in most layers
        return 1.0 / float(params_ratio)
    return DEFAULT_SPEEDUP


class LoadedMetanet:
    """A `MetaNetwork` behind the pruning engine's seam: rewrite weights, propose keep ratios.

    Args:
        metanet: the network (used in eval mode, without gradients).
        document: its checkpoint's JSON document (config, training metadata), if any.

    Example::

        loaded = load_metanet("metaprune/checkpoints/metanet.safetensors")
        rewritten = loaded.transform(model, (x,))             # model itself is untouched
        loaded.precision = "auto"     # bf16 message passing for a large model (inference)
        policy = loaded.layer_keep_ratios(rewritten, (x,), speedup=2.0)
        prune(model, (x,), method="metanet", metanet=loaded, data="mnist1d", speedup=2.0)
    """

    def __init__(self, metanet: MetaNetwork, document: dict | None = None):
        self.metanet = metanet.eval()
        self.document = dict(document or {})

    @property
    def training_metadata(self) -> dict:
        return dict(self.document.get("training", {}))

    @property
    def head_trained(self) -> bool:
        """Whether the sparsity head was trained (``training.sparsity_head_trained``).

        An untrained head only echoes the uniform prior, so the engine allocates globally
        instead of asking it.
        """
        return bool(self.training_metadata.get("sparsity_head_trained", False))

    @property
    def rewrites_weights(self) -> bool:
        """False when the rewrite is exactly the identity (`MetaNetwork.rewrites_weights`):
        `transform` then copies the module instead of running the message passing."""
        return self.metanet.rewrites_weights

    @property
    def precision(self) -> str:
        """The dtype of the metanetwork's per-edge work, for `transform` and the keep ratios:
        "fp32" (the default), "bf16" or "auto" (bf16 for large graphs on a CPU with native
        bf16). Set it on this object; see `metaprune.metanet.precision`."""
        return self.metanet.precision

    @precision.setter
    def precision(self, value: str) -> None:
        self.metanet.precision = value

    def transform(self, module: nn.Module, example_inputs: Sequence) -> nn.Module:
        """A new module with the metanetwork's rewritten weights (`module` is left untouched)."""
        if not self.rewrites_weights:  # every delta is exactly 0: skip the message passing
            return copy.deepcopy(module)
        graph = to_graph(module, _as_tuple(example_inputs))
        with torch.no_grad():
            new_x, new_edge_attr, _ = self.metanet(graph)
        return graph.write_back(new_x, new_edge_attr)

    def keep_ratios_by_layer(self, module: nn.Module, example_inputs: Sequence,
                             speedup: float = DEFAULT_SPEEDUP) -> dict[str, float]:
        """Graph layer name -> the sparsity head's keep ratio, for every graph layer."""
        graph = to_graph(module, _as_tuple(example_inputs))
        with torch.no_grad():
            _, _, keep = self.metanet(graph, speedup, rewrite_edges=False)
        return {layer.name: float(ratio) for layer, ratio in zip(graph.layers, keep.tolist())}

    def layer_keep_ratios(self, module: nn.Module, example_inputs: Sequence, *,
                          speedup: float | None = None,
                          params_ratio: float | None = None) -> dict[str, float]:
        """Module name -> keep ratio, one per prunable channel group of the pruning engine.

        The head answers per graph layer (conditioned on the speed-up; a params ratio r is
        taken as a speed-up of 1/r); `metaprune.metanet.policy.group_policy` turns that into
        one ratio per channel group the engine may prune.
        """
        inputs = _as_tuple(example_inputs)
        target = _target_speedup(speedup, params_ratio)
        return group_policy(module, inputs, self.keep_ratios_by_layer(module, inputs, target))


def load_metanet(name_or_path) -> LoadedMetanet:
    """The one way to load a metanetwork: by name, by path, or an already loaded one.

    Args:
        name_or_path: ``"default"`` (the committed universal checkpoint), the name of a
            checkpoint under ``metaprune/checkpoints/`` (its file stem, e.g.
            ``"metanet-cnn1d"``), a ``.safetensors`` path with its JSON config beside it, or a
            loaded object with ``transform`` and ``layer_keep_ratios`` (returned as it is).

    Returns:
        A `LoadedMetanet`: ``transform(module, example_inputs) -> module`` (a new module with
        rewritten weights) and ``layer_keep_ratios(module, example_inputs, speedup=...)``
        (module name -> keep ratio from the sparsity head).

    Raises:
        MetaPruneError: no such checkpoint (the message names the classic criteria to use
            instead); ModelFormatError: the files are unreadable, unsafe or inconsistent.

    Example::

        import metaprune
        metanet = metaprune.load_metanet("default")
        rewritten = metanet.transform(model, (x,))          # `model` is left untouched
        policy = metanet.layer_keep_ratios(rewritten, (x,), speedup=2.0)
    """
    if not isinstance(name_or_path, (str, Path)):
        if not (hasattr(name_or_path, "transform") and hasattr(name_or_path, "layer_keep_ratios")):
            raise MetaPruneError("a metanetwork object must provide transform() and "
                                 "layer_keep_ratios()")
        return name_or_path
    # read at call time: tests point the folder at an empty one (a build without a checkpoint)
    from metaprune.pruning import metanet_bridge

    metanet, document = read_metanet(resolve_checkpoint(name_or_path,
                                                        metanet_bridge.CHECKPOINT_DIR))
    return LoadedMetanet(metanet, document)
