"""The seam between the pruning engine and the metanetwork.

A loaded metanetwork is any object with two methods:

- `transform(module, example_inputs) -> nn.Module`: a new module whose weights the metanetwork
  rewrote so that they are easy to prune (the input is left untouched);
- `layer_keep_ratios(module, example_inputs, *, speedup=None, params_ratio=None)
  -> dict[str, float]`: module name -> keep ratio, the per-layer sparsity head's answer;
- optionally `head_trained` (bool): False means the head is untrained, so the engine allocates
  with its global ranking instead.

`metaprune.metanet.load_metanet(path)` returns such an object; the committed checkpoint lives in
`metaprune/checkpoints/`. Until one is there, asking for the metanetwork is a clear error that
names the classic criteria to fall back on.
"""

from pathlib import Path

from torch import nn

from metaprune.criteria import DATA_FREE_CRITERIA
from metaprune.errors import MetaPruneError

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"


def _fallback_hint() -> str:
    return (f"prune with a classic criterion instead (method= one of "
            f"{', '.join(DATA_FREE_CRITERIA)}, or taylor/hessian with data)")


def default_checkpoint() -> Path | None:
    """The committed metanetwork checkpoint, if any."""
    if not CHECKPOINT_DIR.is_dir():
        return None
    found = sorted(CHECKPOINT_DIR.glob("metanet*.safetensors"))
    return found[0] if found else None


def require_data_for_metanet(data) -> None:
    """The metanetwork rewrites weights that only fine-tuning recovers: refuse without data."""
    if data is None:
        raise MetaPruneError(
            "the metanetwork path needs data: its rewritten weights must be recovered by "
            f"fine-tuning, so give a dataset; or {_fallback_hint()}"
        )


def load_metanet(metanet):
    """A loaded metanetwork from None, "default", a checkpoint path, or a loaded object."""
    if metanet is None:
        return None
    if not isinstance(metanet, (str, Path)):
        if not (hasattr(metanet, "transform") and hasattr(metanet, "layer_keep_ratios")):
            raise MetaPruneError("a metanetwork object must provide transform() and "
                                 "layer_keep_ratios()")
        return metanet
    if metanet == "default":
        path = default_checkpoint()
        if path is None:
            raise MetaPruneError(
                f"no metanetwork checkpoint is available (none committed under {CHECKPOINT_DIR}); "
                + _fallback_hint()
            )
    else:
        path = Path(metanet)
        if not path.is_file():
            raise MetaPruneError(f"metanetwork checkpoint {str(path)!r} does not exist; "
                                 + _fallback_hint())
    try:
        from metaprune.metanet import load_metanet as load_checkpoint
    except ImportError as error:
        raise MetaPruneError(
            "this build cannot load metanetwork checkpoints (metaprune.metanet.load_metanet is "
            f"missing); {_fallback_hint()}"
        ) from error
    return load_checkpoint(path)


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
