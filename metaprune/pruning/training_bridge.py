"""Data, evaluation and fine-tuning for the pruning engine, imported only when data is given.

`metaprune.data` and `metaprune.finetune` own these; the engine reaches them through this one
module so that pruning without data never imports them.
"""

from importlib import import_module

from torch import nn

from metaprune.errors import InvalidTargetError, MetaPruneError

DATA_BATCH_SIZE = 128


def _component(module_name: str, attribute: str):
    try:
        return getattr(import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise MetaPruneError(
            f"{module_name}.{attribute} is not available in this build, so data cannot be used"
        ) from error


def resolve_data(data, example_inputs, *, seed: int = 0):
    """``((train_loader, test_loader), note)`` from a dataset id, a folder, or a loader pair,
    with inputs fitted to the model's example input by size-1 dimensions (`note` says how, or
    is None); ``(None, None)`` without data. A shape that does not fit raises before any work.
    """
    if data is None:
        return None, None
    loaders = _component("metaprune.data", "resolve_loaders")(data, batch_size=DATA_BATCH_SIZE,
                                                              seed=seed)
    return _component("metaprune.data.adapt", "adapt_loaders")(loaders, example_inputs)


def seed_of(config: dict | None) -> int:
    """The seed of data order and fine-tuning (`FinetuneConfig.seed`; 0 by default)."""
    seed = (config or {}).get("seed", 0)
    return seed if isinstance(seed, int) else 0


def evaluate(model: nn.Module, loader) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float(_component("metaprune.finetune", "evaluate")(model, loader))


def finetune_config(config: dict | None):
    """The validated `FinetuneConfig` (bad settings fail before any pruning work)."""
    return _component("metaprune.finetune", "FinetuneConfig").from_dict(config)


def metanet_epochs(total: int, config: dict | None, *, rewrites: bool = True) -> int:
    """Epochs of the `total` fine-tune budget spent right after the metanetwork's rewrite.

    By default half (rounded down) when the metanetwork rewrites weights, and none when it does
    not (a head-only checkpoint, the null metanetwork): fine-tuning an unchanged model before
    pruning only takes steps from after pruning, which costs 3-5 pts at 4 epochs (issue 12).
    ``config["metanet_epochs"]`` overrides either default.
    """
    chosen = finetune_config(config).metanet_epochs if config is not None else None
    default = total // 2 if rewrites else 0
    epochs = default if chosen is None else chosen
    if epochs > total:
        raise InvalidTargetError(f"finetune metanet_epochs ({epochs}) exceeds finetune_epochs "
                             f"({total}), the whole budget")
    return epochs


def finetune(model: nn.Module, train_loader, *, epochs: int, config: dict | None,
             eval_loader=None, teacher: nn.Module | None = None) -> list[dict]:
    """Trains `model` in place for `epochs` (0: only BatchNorm recalibration, if configured).

    The teacher (the dense model) is used only when the config asks for distillation.
    """
    train = _component("metaprune.finetune", "train")
    settings = finetune_config(config)
    return list(train(model, train_loader, epochs=epochs, config=settings,
                      eval_loader=eval_loader, teacher=teacher if settings.distill else None))
