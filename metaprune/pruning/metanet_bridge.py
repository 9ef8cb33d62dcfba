"""The seam between the pruning engine and the metanetwork.

A loaded metanetwork is any object with two methods:

- `transform(module, example_inputs) -> nn.Module`: a new module whose weights the metanetwork
  rewrote so that they are easy to prune (the input is left untouched);
- `layer_keep_ratios(module, example_inputs, *, speedup=None, params_ratio=None)
  -> dict[str, float]`: module name -> keep ratio, the per-layer sparsity head's answer;
- optionally `head_trained` (bool): False means the head is untrained, so the engine allocates
  with its global ranking instead.

`metaprune.load_metanet(name_or_path)` returns such an object; checkpoints are found by
`metaprune.vocabulary.resolve_checkpoint` in `CHECKPOINT_DIR` (``metaprune/checkpoints/``).
Without one, asking for the metanetwork is a clear error that names the classic criteria.
"""

from pathlib import Path

from torch import nn

from metaprune.vocabulary.checkpoints import CHECKPOINT_DIR
from metaprune.vocabulary.checkpoints import default_checkpoint as find_default_checkpoint

__all__ = ["CHECKPOINT_DIR", "apply_metanet", "default_checkpoint"]


def default_checkpoint() -> Path | None:
    """The committed metanetwork checkpoint, if any."""
    return find_default_checkpoint(CHECKPOINT_DIR)


def apply_metanet(metanet, module: nn.Module, example_inputs, *, speedup=None,
                  params_ratio=None) -> tuple[nn.Module, dict[str, float] | None]:
    """Rewrites the weights with the metanetwork and asks it for per-layer keep ratios
    (None when its sparsity head is untrained)."""
    transformed = metanet.transform(module, example_inputs)
    if not getattr(metanet, "head_trained", True):
        return transformed, None
    ratios = metanet.layer_keep_ratios(transformed, example_inputs, speedup=speedup,
                                       params_ratio=params_ratio)
    return transformed, dict(ratios)
