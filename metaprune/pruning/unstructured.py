"""Unstructured magnitude sparsity: zero the smallest weights, keep the shapes.

Unlike channel pruning this saves no MACs on dense kernels; it is offered for sparse runtimes
and as a reference point.
"""

import torch
from torch import nn

from metaprune.errors import InvalidTargetError

_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


@torch.no_grad()
def prune_unstructured(module: nn.Module, sparsity: float, *,
                       scope: str = "global") -> dict[str, torch.Tensor]:
    """Zeros the `sparsity` fraction of smallest-magnitude conv/Linear weights, in place.

    Args:
        module: the network; its weights are modified in place.
        sparsity: fraction of weights to zero, in [0, 1).
        scope: `"global"` (one magnitude threshold over all layers) or `"layer"` (the same
            fraction in every layer).

    Returns:
        module name -> boolean mask of the weights kept (`mask_density` summarises it).

    Example::

        masks = prune_unstructured(model, 0.8)
        mask_density(masks)   # {"conv1": 0.31, "fc": 0.12, ...}, 0.2 overall
    """
    if not 0.0 <= float(sparsity) < 1.0:
        raise InvalidTargetError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if scope not in ("global", "layer"):
        raise InvalidTargetError(f"scope must be 'global' or 'layer', got {scope!r}")
    layers = {name: m for name, m in module.named_modules() if isinstance(m, _WEIGHTED)}
    if not layers:
        raise InvalidTargetError("the model has no convolution or Linear weights to sparsify")

    def threshold(values: torch.Tensor) -> float:
        count = int(sparsity * values.numel())
        if count == 0:
            return -1.0
        return float(torch.kthvalue(values.flatten().float(), count).values)

    if scope == "global":
        shared = threshold(torch.cat([m.weight.abs().flatten() for m in layers.values()]))
    masks = {}
    for name, layer in layers.items():
        limit = shared if scope == "global" else threshold(layer.weight.abs())
        mask = layer.weight.abs() > limit
        layer.weight.mul_(mask)
        masks[name] = mask
    return masks


def mask_density(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Kept fraction per layer, plus `"total"` over all of them."""
    density = {name: float(mask.float().mean()) for name, mask in masks.items()}
    kept = sum(int(mask.sum()) for mask in masks.values())
    density["total"] = kept / max(1, sum(mask.numel() for mask in masks.values()))
    return density
